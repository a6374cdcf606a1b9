"""The whole loop over real parts: service -> Kafka -> ingest -> store <- /feedback; retrain; hot reload."""

from __future__ import annotations

import logging
import subprocess
import time

import httpx
import pytest

from tests.conftest import app_client, run_cli, running_service
from tests.retrain.conftest import ADMIN_TOKEN, predict
from tests.support import product_reviews

pytestmark = pytest.mark.slow


def test_corrections_through_the_api_make_the_served_model_better(
    loop_env: dict[str, str], ingest: subprocess.Popen[bytes]
) -> None:
    corrections = product_reviews(160, seed=1)
    unseen = product_reviews(40, seed=99)
    # As a team would run it: an annotator with a key, whom a reviewer trusts.
    created = run_cli(loop_env, "keys", "create", "annotator-1", "--role", "annotator")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert run_cli(loop_env, "sources", "trust", "annotator-1").returncode == 0
    with (
        running_service(loop_env) as url,
        httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": key}) as http,
    ):
        first_version = http.get("/model").json()["version"]
        before = predict(http, unseen["text"].tolist())
        right_before = sum(p["label"] == t for p, t in zip(before, unseen["label"], strict=True))

        predictions = predict(http, corrections["text"].tolist())
        for prediction, truth in zip(predictions, corrections["label"], strict=True):
            body = {"prediction_id": prediction["prediction_id"], "label": truth, "source": "annotation"}
            assert http.post("/feedback", json=body).status_code == 202

        # Each correction is accepted once its prediction has come through Kafka into the store.
        deadline = time.monotonic() + 90
        while True:
            stats = run_cli(loop_env, "feedback", "export").stdout
            if stats.count(",accepted") >= 160:
                break
            assert time.monotonic() < deadline and ingest.poll() is None, stats[-2000:]
            time.sleep(1)

        assert httpx.post(f"{url}/retrain", timeout=30).status_code == 401, "keys exist: no key, no access"
        assert http.post("/retrain").status_code == 403, "an annotator is not an admin"
        retrain = run_cli(loop_env, "retrain", "now")
        assert retrain.returncode == 0, retrain.stderr
        assert ": promoted" in retrain.stdout, retrain.stdout

        deadline = time.monotonic() + 30
        while (model := http.get("/model").json())["version"] == first_version:
            assert time.monotonic() < deadline, "the service did not pick up the new champion"
            time.sleep(0.5)
        after = predict(http, unseen["text"].tolist())
        assert {p["model_version"] for p in after} == {model["version"]}
        right_after = sum(p["label"] == t for p, t in zip(after, unseen["label"], strict=True))
        assert right_after >= 32 and right_after > right_before + 8, (right_before, right_after)
        corrected = predict(http, corrections["text"].tolist())
        fixed = sum(p["label"] == t for p, t in zip(corrected, corrections["label"], strict=True))
        assert fixed >= 0.9 * len(corrections)

        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        runs = httpx.get(f"{url}/retrain/runs", headers=admin, timeout=30).json()
        assert runs[0]["status"] == "promoted" and runs[0]["challenger_version"] == model["version"]
        scores = {side: runs[0][f"{side}_metrics"]["feedback"]["macro_f1"] for side in ("champion", "challenger")}
        assert scores["challenger"] > scores["champion"]


def test_admin_retrain_endpoint_queues_a_run(loop_env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with app_client(loop_env) as http:
        assert http.post("/retrain").status_code == 401
        assert http.post("/retrain", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # A ready app answers on the first try: its database is open.
        queued = http.post("/retrain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert queued.status_code == 202, queued.text
        again = http.post("/retrain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert again.json()["run_id"] == queued.json()["run_id"]
        assert http.get("/retrain/runs").json()[0] == {**queued.json()}
    assert caplog.records, "the app logged nothing at all: the check below would prove nothing"
    assert ADMIN_TOKEN not in caplog.text
