"""A champion whose weights are damaged on disk: the service refuses it, says so, keeps serving a model that loads,
and hot reload lives on to pick up the next promotion."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.registry import ModelRegistry
from tests.conftest import app_client, copy_home, free_port, local_metric, running_service, settings_from, wait_until
from tests.flywheel.model_files import garble_header, register_copy, truncate_weights
from tests.service.conftest import FAST_ENV, metric


@pytest.fixture()
def env(trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path) -> dict[str, str]:
    return {**copy_home(trained_home, tmp_path / "home"), **FAST_ENV, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}


def test_a_service_starting_with_a_corrupt_champion_serves_the_previous_one(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    registry = ModelRegistry(settings_from(env))
    first = registry.champion()
    second = register_copy(registry)
    registry.promote(second, reason="test")
    truncate_weights(registry, second)

    with caplog.at_level(logging.WARNING, logger="service.champion"), app_client(env) as client:
        info = client.get("/model").json()
        assert (info["version"], info["champion"], info["fallback"]) == (first, second, True), info
        assert info["refused"]["version"] == second and info["refused"]["attempts"] == 1
        assert "SafetensorError" in info["refused"]["reason"], info["refused"]
        answer = client.post("/predict", json={"text": "a wonderful film"})
        assert answer.status_code == 200 and answer.json()["model_version"] == first
        assert local_metric("flywheel_champion_refused", version=second) == 1
        assert local_metric("flywheel_champion_load_failures_total", version=second) == 1
        assert f"cannot load champion {second}" in caplog.text
        assert f"falling back to {first}, the newest earlier champion that loads" in caplog.text

        # Promoting a model that loads ends the fallback and clears the refusal.
        third = register_copy(registry, of=first)
        registry.promote(third, reason="test")
        wait_until(lambda: client.get("/model").json()["version"] == third, what="the next champion")
        info = client.get("/model").json()
        assert (info["champion"], info["fallback"], info["refused"]) == (third, False, None), info
        assert local_metric("flywheel_champion_refused", version=second) == 0


@pytest.mark.slow
def test_a_corrupt_promotion_keeps_the_old_model_serving_and_hot_reload_alive(env: dict[str, str]) -> None:
    registry = ModelRegistry(settings_from(env))
    first = registry.champion()
    broken = register_copy(registry)
    garble_header(registry, broken)
    port = free_port()

    with running_service(env, port=port) as url, httpx.Client(base_url=url, timeout=30) as http:

        def refused() -> str | None:
            return (http.get("/model").json().get("refused") or {}).get("version")

        registry.promote(broken, reason="test")
        wait_until(lambda: refused() == broken, what="the service to refuse the broken champion")
        info = http.get("/model").json()
        assert (info["version"], info["champion"], info["fallback"]) == (first, broken, True), info
        assert "SafetensorError" in info["refused"]["reason"], info["refused"]
        for _ in range(5):
            answer = http.post("/predict", json={"texts": ["a great film", "an awful film"]})
            assert answer.status_code == 200 and answer.json()["model_version"] == first
        assert metric(url, "flywheel_champion_refused", version=broken) == 1
        assert metric(url, "flywheel_champion_load_failures_total", version=broken) >= 1
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["components"]["hot_reload"]["up"] is True

        fixed = register_copy(registry, of=first)
        registry.promote(fixed, reason="test")
        wait_until(lambda: http.get("/model").json()["version"] == fixed, what="hot reload of the next champion")
        assert http.get("/model").json()["refused"] is None
        assert metric(url, "flywheel_champion_refused", version=broken) == 0

    log = (Path(env["FLYWHEEL_HOME"]) / f"serve-{port}.log").read_text()
    assert f"cannot load champion {broken} (SafetensorError" in log
