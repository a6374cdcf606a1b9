"""`flywheel broker` and `flywheel serve` end to end: a prediction served by the CLI lands on the CLI's broker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from kafka import KafkaAdminClient

from flywheel.broker import wait_for_port
from flywheel.events import PredictionEvent, Topic
from tests.conftest import copy_home, free_port, read_topic

pytestmark = pytest.mark.slow

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def test_cli_broker_and_serve(trained_home: dict[str, str], tmp_path: Path) -> None:
    env = copy_home(trained_home, tmp_path / "home")
    broker_port, serve_port = free_port(), free_port()
    bootstrap = f"127.0.0.1:{broker_port}"
    full_env = {
        **os.environ,
        **env,
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
        "FLYWHEEL_TORCH_THREADS": "1",
    }
    full_env.pop("BENTOML_HOME", None)
    broker = subprocess.Popen(
        [FLYWHEEL, "broker", "--port", str(broker_port)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = None
    try:
        wait_for_port("127.0.0.1", broker_port, 30)
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        _wait(lambda: set(Topic) <= set(admin.list_topics()), what="topics created")
        admin.close()

        server = subprocess.Popen(
            [FLYWHEEL, "serve", "--host", "127.0.0.1", "--port", str(serve_port)],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{serve_port}"
        _wait(lambda: _ready(url), what="flywheel serve ready", timeout=120)
        prediction = httpx.post(f"{url}/predict", json={"text": "a wonderful cast"}).json()["predictions"][0]
        assert prediction["model_version"] == httpx.get(f"{url}/model").json()["version"]
        # BentoML's state went under the Flywheel home, not ~/bentoml, in a directory of this server's own.
        servers = Path(env["FLYWHEEL_HOME"]) / "bentoml" / "servers"
        assert list(servers.glob(f"*-{serve_port}/prometheus_multiproc_dir"))

        events = read_topic(
            bootstrap,
            Topic.PREDICTIONS,
            lambda evs: any(getattr(e, "prediction_id", None) == prediction["prediction_id"] for e in evs),
        )
        assert [e for e in events if isinstance(e, PredictionEvent)][-1].prediction_id == prediction["prediction_id"]
    finally:
        if server is not None:
            _stop(server)
        broker.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        try:
            # The broker gives tansu 10 s to stop before killing it; a loaded machine adds the CLI's own exit.
            output = broker.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(broker.pid, signal.SIGKILL)
            raise
    assert broker.returncode == 0
    assert "DEV ONLY" in output and "in memory" in output and "stopping broker" in output


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.2)
