"""Promoting a new champion while clients send requests: no request fails and the service switches over."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.registry import TRAINING_DATA_FILE, ModelRegistry
from flywheel.settings import Settings
from tests.conftest import copy_home, running_service
from tests.service.conftest import FAST_ENV, metric

pytestmark = pytest.mark.slow


def _second_version(registry: ModelRegistry) -> str:
    """Register another version (the champion's weights under a new version and card)."""
    champion = registry.champion_version()

    def write(path: Path) -> None:
        shutil.copytree(champion.model_dir, path / "model", dirs_exist_ok=True)
        shutil.copy(champion.training_data_path, path / TRAINING_DATA_FILE)

    card = champion.card.model_copy(update={"parent_version": champion.version})
    return registry.save(card, write).version


class Traffic:
    """Client threads posting /predict in a loop, recording (start, end, status, versions) of every request."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.records: list[tuple[float, float, int, set[str]]] = []
        #: Bodies of the answers that were not 200, to say why.
        self.refusals: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(threads)]

    def _loop(self, index: int) -> None:
        body = {"texts": ["a great film", "an awful film"]} if index % 2 else {"text": "a lovely story"}
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                response = http.post("/predict", json=body)
                versions: set[str] = set()
                if response.status_code == 200:
                    data = response.json()
                    versions = {p["model_version"] for p in data["predictions"]} | {data["model_version"]}
                else:
                    self.refusals.append(response.text)
                self.records.append((started, time.monotonic(), response.status_code, versions))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()



def _all_workers_swapped(url: str, swaps: int, timeout: float = 60.0) -> float:
    """Wait until the workers together report ``swaps`` model loads; returns when that was seen."""
    deadline = time.monotonic() + timeout
    while metric(url, "flywheel_model_swaps_total") < swaps:
        assert time.monotonic() < deadline, f"workers did not reach {swaps} model swaps"
        time.sleep(0.1)
    return time.monotonic()


def test_every_worker_switches_on_promotion_and_rollback_without_failing_a_request(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = {
        **copy_home(trained_home, tmp_path / "home"),
        **FAST_ENV,
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_SERVE_WORKERS": "2",
        # A fixed bound: refusals under load are what the admission tests check, not this one.
        "FLYWHEEL_ADMISSION_MAX_TEXTS": "256",
    }
    registry = ModelRegistry(Settings(home=Path(env["FLYWHEEL_HOME"])))
    first = registry.champion()
    assert first is not None
    second = _second_version(registry)

    with running_service(env) as url:
        _all_workers_swapped(url, 2)  # each worker loaded the champion once
        with Traffic(url) as traffic:
            time.sleep(1.0)
            promoted_at = time.monotonic()
            registry.promote(second, reason="test")
            switched = _all_workers_swapped(url, 4)
            time.sleep(1.5)
            assert httpx.get(f"{url}/model").json()["version"] == second
            rollback_at = time.monotonic()
            registry.rollback(reason="test")
            switched_back = _all_workers_swapped(url, 6)
            time.sleep(1.5)
        assert metric(url, "flywheel_served_model", version=first) == 1
        assert metric(url, "flywheel_served_model", version=second) == 0

    records = traffic.records
    assert {status for _, _, status, _ in records} == {200}, f"every request succeeded: {traffic.refusals[:3]}"
    assert all(len(versions) == 1 for *_, versions in records), "each request is answered by one model"
    assert all(v == {first} for start, _, _, v in records if start < promoted_at)
    # Once every worker has swapped, every request sent afterwards reports the new model.
    on_second = [v for start, _, _, v in records if switched < start < rollback_at]
    on_first_again = [v for start, _, _, v in records if start > switched_back]
    assert on_second and all(v == {second} for v in on_second)
    assert on_first_again and all(v == {first} for v in on_first_again)
