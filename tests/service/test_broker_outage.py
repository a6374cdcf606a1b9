"""The broker goes down and comes back: predictions keep succeeding, events are spilled, then all delivered once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.events import PredictionEvent, Topic
from tests.conftest import copy_home, free_port, read_topic, running_service
from tests.service.conftest import FAST_ENV, metric

pytestmark = pytest.mark.slow


def _predict(http: httpx.Client, n: int, tag: str) -> list[str]:
    ids = []
    for i in range(n):
        started = time.perf_counter()
        response = http.post("/predict", json={"texts": [f"{tag} great movie {i}", f"{tag} awful movie {i}"]})
        assert response.status_code == 200, response.text
        # A prediction never waits for the broker (whose timeout here is 3 s).
        assert time.perf_counter() - started < 2.0
        ids += [p["prediction_id"] for p in response.json()["predictions"]]
    return ids


def _logged_ids(bootstrap: str, wanted: set[str]) -> list[str]:
    def ours(events: list) -> list[str]:
        return [e.prediction_id for e in events if isinstance(e, PredictionEvent) and e.prediction_id in wanted]

    return ours(read_topic(bootstrap, Topic.PREDICTIONS, lambda evs: set(ours(evs)) >= wanted, timeout=60))


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_predictions_survive_a_broker_outage_and_every_event_arrives_once(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    env = {**copy_home(trained_home, tmp_path / "home"), **FAST_ENV, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}
    try:
        with running_service(env) as url, httpx.Client(base_url=url, timeout=30) as http:
            before = _predict(http, 3, "before")
            assert sorted(_logged_ids(broker.bootstrap, set(before))) == sorted(before)

            broker.stop()
            during = _predict(http, 15, "during")
            _wait_for(lambda: metric(url, "flywheel_kafka_events_total", outcome="spilled") >= len(during))
            assert metric(url, "flywheel_kafka_spill_bytes") > 0
            assert list((tmp_path / "home" / "spill").glob("*.spill"))
            assert http.get("/readyz").status_code == 200, "spilling still counts as ready"

            broker.start()
            after = _predict(http, 3, "after")
            wanted = set(during) | set(after)
            # The restarted broker is a new, empty in-memory one: exactly the outage's events and later ones.
            logged = _logged_ids(broker.bootstrap, wanted)
            assert sorted(logged) == sorted(wanted), "none missing, none duplicated"
            assert logged.index(during[-1]) < logged.index(after[0]), "spilled events are replayed first"
            _wait_for(lambda: metric(url, "flywheel_kafka_spill_bytes") == 0)
            assert metric(url, "flywheel_kafka_events_total", outcome="dropped") == 0
    finally:
        broker.stop()
