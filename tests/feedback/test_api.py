"""``POST /feedback``, ``GET /feedback/{id}`` and ``GET /review`` of the in-process app, on both databases."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import FeedbackEvent, Topic, new_id
from flywheel.models.feedback import Prediction
from tests.conftest import app_client, copy_home, read_topic, scratch_database_url, wait_until

pytestmark = pytest.mark.slow

FLYWHEEL = shutil.which("flywheel") or str(Path(os.sys.executable).parent / "flywheel")  # type: ignore[attr-defined]
RATE_LIMIT = 20


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest,
    trained_home: dict[str, str],
    broker: EmbeddedBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The app on a fresh database; yields a client and the environment."""
    directory = tmp_path_factory.mktemp(f"feedback-api-{request.param}")
    with scratch_database_url(request.param, directory) as url:
        env = {
            **copy_home(trained_home, directory / "home"),
            "FLYWHEEL_DATABASE_URL": url,
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_FEEDBACK_RATE_LIMIT": str(RATE_LIMIT),
            "FLYWHEEL_FEEDBACK_GRACE_SECONDS": "3",
            "FLYWHEEL_INGEST_MAX_POLL_INTERVAL_MS": "2000",
        }
        with app_client(env) as client:
            yield client, env


def post(client: TestClient, body: Any, **kwargs: Any) -> httpx.Response:
    if isinstance(body, bytes | str):
        return client.post("/feedback", content=body, headers={"content-type": "application/json"})
    return client.post("/feedback", json=body, **kwargs)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "request body is empty"),
        (b"{label: positive}", 400, "request body is not valid JSON"),
        ([{"label": "positive"}], 422, "request body must be a JSON object"),
        ({"prediction_id": "p1"}, 422, "label: Field required"),
        ({"label": "positive"}, 422, "give either prediction_id (to correct a prediction) or text"),
        ({"prediction_id": "p1", "text": "t", "label": "positive"}, 422, "give either prediction_id"),
        ({"prediction_id": "p1", "label": "neutral"}, 422, "label 'neutral' is not one of model"),
        ({"prediction_id": "p1", "label": 1}, 422, "label: Input should be a valid string"),
        ({"prediction_id": ["p1"], "label": "positive"}, 422, "prediction_id: Input should be a valid string"),
        ({"text": "t", "label": "positive", "lable": "x"}, 422, "lable: Extra inputs are not permitted"),
        ({"text": "t", "label": "positive", "source": "two words"}, 422, "source: Value error, invalid source"),
        ({"text": "t", "label": "positive", "comment": "x" * 2001}, 422, "comment is 2001 characters; at most 2000"),
        ({"text": "t", "label": "positive", "comment": "x" * 5_000_000}, 413, "larger than any valid feedback"),
        ({"text": "t" * 5001, "label": "positive"}, 422, "text is 5001 characters; at most 5000 allowed"),
    ],
)
def test_bad_feedback_bodies_get_4xx_with_a_message(
    served: tuple[TestClient, dict[str, str]], body: Any, status: int, message: str
) -> None:
    response = post(served[0], body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_review_limit_is_validated(served: tuple[TestClient, dict[str, str]]) -> None:
    http = served[0]
    response = http.get("/review", params={"limit": 0})
    assert response.status_code == 422
    assert "limit" in response.json()["detail"]
    assert http.get("/review", params={"limit": 3}).status_code == 200


def test_one_source_is_rate_limited(served: tuple[TestClient, dict[str, str]]) -> None:
    source = f"flood-{uuid.uuid4().hex[:6]}"
    answers = [
        post(served[0], {"text": f"text {i}", "label": "positive", "source": source}) for i in range(RATE_LIMIT + 1)
    ]
    assert [a.status_code for a in answers[:RATE_LIMIT]] == [202] * RATE_LIMIT
    assert answers[-1].status_code == 429
    assert f"source '{source}' sent more than {RATE_LIMIT} feedback per minute" in answers[-1].json()["detail"]
    assert int(answers[-1].headers["retry-after"]) >= 1
    other = post(served[0], {"text": "text 0", "label": "positive", "source": f"calm-{uuid.uuid4().hex[:6]}"})
    assert other.status_code == 202


def test_feedback_flows_through_kafka_into_the_store(served: tuple[TestClient, dict[str, str]]) -> None:
    http, env = served
    token = uuid.uuid4().hex[:6]
    texts = [f"good great excellent film {token}", f"bad awful terrible mess {token}", f"the plot happens {token}"]
    predicted = http.post("/predict", json={"texts": texts}).json()["predictions"]
    ids = [p["prediction_id"] for p in predicted]

    early = post(http, {"prediction_id": ids[0], "label": "negative", "source": "e2e", "comment": "sarcasm"})
    assert early.status_code == 202, early.text
    receipt = early.json()
    assert receipt["status"] == "pending" and "waiting for prediction" in receipt["status_reason"]
    again = post(http, {"prediction_id": ids[0], "label": "positive", "source": "e2e"})
    assert again.json()["feedback_id"] == receipt["feedback_id"] and again.json()["label"] == "positive"
    orphan = post(http, {"prediction_id": new_id(), "label": "positive", "source": "e2e"}).json()
    labeled = post(http, {"text": "an unseen sentence", "label": "negative", "source": "annotation"}).json()
    assert labeled["status"] == "accepted"

    ingest = subprocess.Popen(
        [FLYWHEEL, "ingest", "--group", f"e2e-{uuid.uuid4().hex[:6]}"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        def fetch(feedback_id: str) -> dict[str, Any]:
            return http.get(f"/feedback/{feedback_id}").json()

        wait_until(lambda: fetch(receipt["feedback_id"]).get("text") == texts[0], timeout=60, what="the join")
        wait_until(lambda: fetch(orphan["feedback_id"])["status"] == "rejected", timeout=30, what="the expiry")
    finally:
        ingest.send_signal(signal.SIGTERM)
        output, _ = ingest.communicate(timeout=30)
    assert ingest.returncode == 0, output
    assert "ingest stopped:" in output

    joined = fetch(receipt["feedback_id"])
    assert joined["label"] == "positive" and joined["model_version"] == predicted[0]["model_version"]
    assert joined["model_label"] == predicted[0]["label"]
    assert joined["status"] in ("accepted", "pending")
    assert "grace period" in fetch(orphan["feedback_id"])["status_reason"]

    database = Database(env["FLYWHEEL_DATABASE_URL"])
    try:
        with database.read_session() as session:
            rows = {i: session.get(Prediction, i) for i in ids}
        assert {i: (row.text if row else None) for i, row in rows.items()} == dict(zip(ids, texts, strict=True))
    finally:
        database.dispose()

    queued = {item["prediction_id"] for item in http.get("/review?limit=50").json()}
    assert ids[0] not in queued and {ids[1], ids[2]} <= queued

    published = read_topic(
        env["FLYWHEEL_KAFKA_BOOTSTRAP"],
        Topic.FEEDBACK.value,
        lambda events: any(getattr(e, "feedback_id", None) == labeled["feedback_id"] for e in events),
    )
    ours = [e for e in published if isinstance(e, FeedbackEvent) and e.source in ("e2e", "annotation")]
    assert {e.feedback_id for e in ours} >= {receipt["feedback_id"], orphan["feedback_id"], labeled["feedback_id"]}
