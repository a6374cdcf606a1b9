"""The request log under real faults, end to end: a full disk while Kafka is down, and a SIGKILL mid-traffic."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.events import PredictionEvent, Topic
from flywheel.settings import Settings
from tests.conftest import app_client, copy_home, free_port, local_metric, read_topic, running_service, wait_until
from tests.faults import fill, small_filesystem
from tests.flywheel.test_publisher_faults import SIGKILL_WINDOW_MS
from tests.service.conftest import FAST_ENV

pytestmark = pytest.mark.slow


def _logged(bootstrap: str, wanted: set[str], timeout: float = 60.0) -> set[str]:
    def ours(events: list[Any]) -> set[str]:
        return {e.prediction_id for e in events if isinstance(e, PredictionEvent) and e.prediction_id in wanted}

    return ours(read_topic(bootstrap, Topic.PREDICTIONS, lambda evs: ours(evs) >= wanted, timeout=timeout))


def test_a_full_disk_shows_in_readyz_and_the_predictions_are_logged_once_space_returns(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {**copy_home(trained_home, tmp_path / "home"), **FAST_ENV, "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}
    with small_filesystem(tmp_path / "home" / "spill") as spill_dir, app_client(env) as client:
        ballast = fill(spill_dir)
        response = client.post("/predict", json={"texts": [f"full disk review {i}" for i in range(8)]})
        assert response.status_code == 200, "predictions never wait on the request log"
        ids = {p["prediction_id"] for p in response.json()["predictions"]}

        wait_until(lambda: client.get("/readyz").status_code == 503, what="/readyz showing the full disk")
        broker = client.get("/readyz").json()["components"]["broker"]
        assert not broker["up"] and "No space left on device" in broker["detail"], broker
        assert "8 events held in memory" in broker["detail"]
        assert local_metric("flywheel_thread_up", thread="publisher-test-app") == 0

        ballast.unlink()
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready again once space returns")
        assert local_metric("flywheel_thread_up", thread="publisher-test-app") == 1
        with EmbeddedBroker(port=port) as kafka:
            assert _logged(kafka.bootstrap, ids) == ids


def _serve_pid(port: int) -> int:
    """The `bentoml serve` process started for ``port``."""
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "serve" in command and "--port" in command and command[command.index("--port") + 1] == str(port):
            return int(process.pid)
    raise AssertionError(f"no `bentoml serve --port {port}` process")


def test_sigkill_of_the_service_mid_traffic_loses_at_most_the_documented_window(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    kafka_port, port = free_port(), free_port()
    env = {
        **copy_home(trained_home, tmp_path / "home"), **FAST_ENV, "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}"
    }
    answered: list[tuple[str, float]] = []
    stop = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            sent = 0
            while not stop.is_set():
                sent += 1
                try:
                    response = http.post("/predict", json={"texts": [f"client {number} review {sent} {j}"
                                                                      for j in range(4)]})
                except httpx.HTTPError:
                    return  # the service is gone
                if response.status_code == 200:
                    at = time.time()
                    answered.extend((p["prediction_id"], at) for p in response.json()["predictions"])

    with running_service(env, port=port):
        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(3)]
        for thread in clients:
            thread.start()
        wait_until(lambda: len(answered) >= 400, timeout=120, what="400 predictions answered")
        server = psutil.Process(_serve_pid(port))
        # BentoML runs each worker in a process group of its own: kill the whole tree, each process at once.
        tree = [server, *server.children(recursive=True)]
        killed_at = time.time()
        for process in tree:
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=10)
        for thread in clients:
            thread.join(20)
        assert not any(thread.is_alive() for thread in clients), "the service still answers after its SIGKILL"
        stop.set()
    accepted = list(answered)
    assert len(accepted) >= 400

    # A restarted service adopts the killed workers' spill files and replays them once Kafka is back.
    with EmbeddedBroker(port=kafka_port) as kafka, running_service(env):
        delivered = _logged(kafka.bootstrap, {prediction_id for prediction_id, _ in accepted}, timeout=60)
    lost = [(prediction_id, at) for prediction_id, at in accepted if prediction_id not in delivered]
    oldest_lost_ms = max(((killed_at - at) * 1000 for _, at in lost), default=0.0)
    assert len(lost) <= Settings().publish_queue_size
    assert oldest_lost_ms <= SIGKILL_WINDOW_MS, (
        f"lost {len(lost)} of {len(accepted)} predictions, answered up to {oldest_lost_ms:.0f} ms before the SIGKILL"
    )
    print(f"SIGKILL of the service lost {len(lost)} of {len(accepted)} predictions, the oldest {oldest_lost_ms:.1f} ms")
