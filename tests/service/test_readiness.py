"""A service started before any champion exists: alive, not ready, 503 on /predict; ready once one is promoted."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from tests.conftest import copy_home, running_service
from tests.service.conftest import FAST_ENV

pytestmark = pytest.mark.slow


def test_service_waits_for_a_first_champion(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = {**copy_home(trained_home, tmp_path / "home"), **FAST_ENV, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}
    registry = ModelRegistry(Settings(home=Path(env["FLYWHEEL_HOME"])))
    version = registry.champion()
    assert version is not None
    registry.pointer_path.unlink()  # a registry with a trained model that nobody promoted yet

    with running_service(env, wait_for="/healthz") as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/readyz").status_code == 503
        refused = http.post("/predict", json={"text": "a great film"})
        assert refused.status_code == 503
        assert "no champion" in refused.json()["detail"]
        assert http.get("/model").status_code == 503

        registry.promote(version, reason="first model")
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.2)
        answer = http.post("/predict", json={"text": "a great film"})
        assert answer.status_code == 200
        assert answer.json()["model_version"] == version
