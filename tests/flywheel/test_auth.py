"""Access control over the in-process app: API keys for clients, admin endpoints disabled without a token."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flywheel.broker import EmbeddedBroker
from tests.conftest import app_client, copy_home

pytestmark = pytest.mark.slow
API_KEY = "client-key-1"


def test_api_keys_guard_clients_and_admin_routes_are_off_without_a_token(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = {
        **copy_home(trained_home, tmp_path / "home"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_API_KEYS": f"other-key,{API_KEY}",
    }
    with app_client(env) as http:
        body = {"text": "the film was excellent"}
        missing = http.post("/predict", json=body)
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
        assert http.post("/predict", json=body, headers={"X-API-Key": "nope"}).status_code == 401
        ok = http.post("/predict", json=body, headers={"X-API-Key": API_KEY})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "positive"

        feedback = {"text": "great", "label": "positive", "source": "tester"}
        assert http.post("/feedback", json=feedback).status_code == 401
        # A ready app answers every route on the first try: no retrying while the store opens.
        accepted = http.post("/feedback", json=feedback, headers={"X-API-Key": API_KEY})
        assert accepted.status_code == 202, accepted.text

        for path in ("/retrain", "/drift/run"):
            refused = http.post(path, headers={"Authorization": "Bearer anything"})
            assert refused.status_code == 403, (path, refused.text)
            assert "FLYWHEEL_ADMIN_TOKEN" in refused.json()["detail"]
    assert caplog.records, "the app logged nothing at all: the check below would prove nothing"
    assert API_KEY not in caplog.text
