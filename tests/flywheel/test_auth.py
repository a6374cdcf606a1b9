"""Access control over a real server: API keys for clients, admin endpoints disabled without a token."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from flywheel.broker import EmbeddedBroker
from tests.conftest import copy_home, running_service

pytestmark = pytest.mark.slow
API_KEY = "client-key-1"


def test_api_keys_guard_clients_and_admin_routes_are_off_without_a_token(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = {
        **copy_home(trained_home, tmp_path / "home"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_API_KEYS": f"other-key,{API_KEY}",
    }
    with running_service(env) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"text": "the film was excellent"}
        missing = http.post("/predict", json=body)
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
        assert http.post("/predict", json=body, headers={"X-API-Key": "nope"}).status_code == 401
        ok = http.post("/predict", json=body, headers={"X-API-Key": API_KEY})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "positive"

        feedback = {"text": "great", "label": "positive", "source": "tester"}
        assert http.post("/feedback", json=feedback).status_code == 401
        deadline = time.monotonic() + 60
        # The feedback store opens in the background after the model: 503 until then, and clients retry.
        while (accepted := http.post("/feedback", json=feedback, headers={"X-API-Key": API_KEY})).status_code == 503:
            assert time.monotonic() < deadline, accepted.text
            time.sleep(0.5)
        assert accepted.status_code == 202, accepted.text

        for path in ("/retrain", "/drift/run"):
            refused = http.post(path, headers={"Authorization": "Bearer anything"})
            assert refused.status_code == 403, (path, refused.text)
            assert "FLYWHEEL_ADMIN_TOKEN" in refused.json()["detail"]
        log = (Path(env["FLYWHEEL_HOME"]) / f"serve-{url.rsplit(':', 1)[1]}.log").read_text()
        assert API_KEY not in log
