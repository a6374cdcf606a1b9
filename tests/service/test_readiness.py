"""Readiness: a starting worker is ready only once every route works; after that a database outage leaves it in
rotation with `/predict` working, and `/readyz` says which component is down."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from flywheel.broker import EmbeddedBroker
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from tests.conftest import TcpProxy, app_client, copy_home, scratch_database_url, wait_until
from tests.service.conftest import FAST_ENV

pytestmark = pytest.mark.slow

FEEDBACK = {"text": "a calm and lovely film", "label": "positive"}
#: A key from FLYWHEEL_API_KEYS: known without the database, so it works while the database is down at start.
KEY = {"X-API-Key": "readiness-test-key"}


def test_service_waits_for_a_first_champion(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = {**copy_home(trained_home, tmp_path / "home"), **FAST_ENV, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}
    registry = ModelRegistry(Settings(home=Path(env["FLYWHEEL_HOME"])))
    version = registry.champion()
    assert version is not None
    registry.pointer_path.unlink()  # a registry with a trained model that nobody promoted yet

    with app_client(env, wait_ready=False) as http:
        components = ("database", "access")
        wait_until(
            lambda: all(http.get("/readyz").json()["components"][name]["up"] for name in components),
            what="the database and the keys",
        )
        not_ready = http.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["components"]["model"] == {"up": False, "detail": "no champion loaded yet"}
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


def test_ready_only_with_the_database_then_an_outage_keeps_predictions_in_rotation(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    with scratch_database_url("postgresql", tmp_path) as url:
        parsed = make_url(url)
        proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
        env = {
            **copy_home(trained_home, tmp_path / "home"),
            **FAST_ENV,
            "FLYWHEEL_DATABASE_URL": parsed.set(port=proxy.port).render_as_string(hide_password=False),
            "FLYWHEEL_DATABASE_READY_TIMEOUT": "1",
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_API_KEYS": KEY["X-API-Key"],
        }
        try:
            with app_client(env, wait_ready=False, headers=KEY) as http:
                # Starting with the database down: predictions work, but the worker does not take traffic yet,
                # because the README's feedback and review steps would fail.
                wait_until(lambda: http.get("/model").status_code == 200, what="the model")
                starting = http.get("/readyz")
                assert starting.status_code == 503
                assert starting.json()["components"]["database"]["up"] is False
                assert http.post("/predict", json={"text": "still serving"}).status_code == 200
                assert http.post("/feedback", json=FEEDBACK).status_code == 503
                # A key the worker cannot check yet, or none, is "retry shortly", never "your key is wrong".
                for headers in ({"X-API-Key": "a-key-stored-in-the-database"}, {"X-API-Key": ""}):
                    unknown = http.post("/predict", json={"text": "whose key?"}, headers=headers)
                    assert unknown.status_code == 503 and unknown.headers["Retry-After"] == "1", unknown.text
                    assert "loading its keys" in unknown.json()["detail"]

                proxy.start()
                wait_until(lambda: http.get("/readyz").status_code == 200, timeout=60, what="readiness")
                # Ready means every route the README walks through answers on the first try.
                assert http.post("/feedback", json=FEEDBACK).status_code == 202
                assert http.post("/predict", json={"text": "x"}, headers={"X-API-Key": "wrong"}).status_code == 401
                # Reviewer reads need a reviewer: a client key is refused (403), not failed (5xx).
                assert http.get("/review").status_code == 403
                assert http.get("/drift").status_code == 403
                assert http.get("/retrain/runs").status_code == 403

                proxy.stop()
                wait_until(
                    lambda: not http.get("/readyz").json()["components"]["database"]["up"], what="the outage"
                )
                during = http.get("/readyz")
                assert during.status_code == 200, "a database outage must not take predictions out of rotation"
                assert "unreachable" in during.json()["components"]["database"]["detail"]
                assert http.post("/predict", json={"text": "still serving"}).status_code == 200
                down = http.post("/feedback", json=FEEDBACK)
                assert down.status_code == 503
                assert "unreachable" in down.json()["detail"]

                proxy.start()
                wait_until(lambda: http.post("/feedback", json=FEEDBACK).status_code == 202, timeout=60,
                           what="the database to come back")
                wait_until(lambda: http.get("/readyz").json()["components"]["database"]["up"], what="the probe")
        finally:
            proxy.stop()
