"""``POST /feedback``, ``GET /feedback/{id}`` and ``GET /review`` of the in-process app, on both databases; labels
owned by their principal, rate limits shared by app instances, and the reviewer's routes, on PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from flywheel.access import AuditLog, KeyStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import FeedbackEvent, Topic, new_id
from flywheel.labels import LabelLedger
from flywheel.models.access import Role
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
            # Every anonymous caller is one principal: the limit is tested with keys, below.
            "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0",
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
        ({"prediction_id": "p1", "label": "neutral"}, 422, "unknown label 'neutral': the model knows negative, pos"),
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
    assert (receipt["source"], receipt["note"]) == ("anonymous", "e2e")
    again = post(http, {"prediction_id": ids[0], "label": "positive", "source": "web"})
    assert again.json()["feedback_id"] == receipt["feedback_id"] and again.json()["label"] == "positive"
    orphan = post(http, {"prediction_id": new_id(), "label": "positive", "source": "e2e"}).json()
    # Claiming the annotation team's name grants no trust: the label waits for evidence like any other.
    labeled = post(http, {"text": f"an unseen sentence {token}", "label": "negative", "source": "annotation"}).json()
    assert (labeled["source"], labeled["note"], labeled["status"]) == ("anonymous", "annotation", "pending")
    assert "waiting for model evidence" in labeled["status_reason"]

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
    ours = {e.feedback_id: e for e in published if isinstance(e, FeedbackEvent) and e.source == "anonymous"}
    assert set(ours) >= {receipt["feedback_id"], orphan["feedback_id"], labeled["feedback_id"]}
    assert ours[labeled["feedback_id"]].note == "annotation"


CLIENT_KEYS = ("client-key-a", "client-key-b")


@pytest.fixture(scope="module")
def keyed(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], str]]:
    """A PostgreSQL database with two client keys (``env-key-1``, ``env-key-2``) and a reviewer ``rita``.

    Yields the app's environment and rita's key; tests start their app instances on it.
    """
    directory = tmp_path_factory.mktemp("feedback-keyed")
    with scratch_database_url("postgresql", directory) as url:
        database = Database(url)
        try:
            _, reviewer_key = KeyStore(database).create("rita", Role.REVIEWER, "test")
        finally:
            database.dispose()
        yield {
            **copy_home(trained_home, directory / "home"),
            "FLYWHEEL_DATABASE_URL": url,
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_API_KEYS": ",".join(CLIENT_KEYS),
            "FLYWHEEL_FEEDBACK_RATE_LIMIT": str(RATE_LIMIT),
        }, reviewer_key


def as_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def wait_for_room_in_the_minute(seconds: float = 20.0) -> None:
    """Limits count in fixed one-minute windows: start a burst where it cannot straddle two of them."""
    left = 60 - (time.time() % 60)
    if left < seconds:
        time.sleep(left + 0.1)


def test_the_rate_limit_is_per_principal_and_shared_by_every_app_instance(
    keyed: tuple[dict[str, str], str],
) -> None:
    env, _ = keyed
    with app_client(env) as first, app_client(env) as second:
        wait_for_room_in_the_minute()
        # Alternate instances, and rotate the claimed source: neither escapes the principal's limit.
        answers = [
            (first if i % 2 else second).post(
                "/feedback",
                json={"text": f"limited text {i}", "label": "positive", "source": f"rotating-{i}"},
                headers=as_key(CLIENT_KEYS[0]),
            )
            for i in range(RATE_LIMIT + 1)
        ]
        assert [a.status_code for a in answers[:RATE_LIMIT]] == [202] * RATE_LIMIT, answers[-2].text
        refused = answers[-1]
        assert refused.status_code == 429
        assert f"'env-key-1' sent more than {RATE_LIMIT} feedback requests this minute" in refused.json()["detail"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        other = second.post("/feedback", json={"text": "calm", "label": "positive"}, headers=as_key(CLIENT_KEYS[1]))
        assert other.status_code == 202, other.text


def test_labels_belong_to_their_principal_and_reviewers_decide(keyed: tuple[dict[str, str], str]) -> None:
    env, reviewer_key = keyed
    client, other, rita = as_key(CLIENT_KEYS[0]), as_key(CLIENT_KEYS[1]), as_key(reviewer_key)
    # Unlimited: the test above may have used up env-key-1's minute.
    with app_client({**env, "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0"}) as http:
        target = http.post("/predict", json={"text": "a film to see twice"}, headers=client).json()
        prediction_id = target["predictions"][0]["prediction_id"]
        database = Database(env["FLYWHEEL_DATABASE_URL"])
        try:
            # Two principals labelling one prediction keep a row each, whatever source either claims.
            mine = http.post(
                "/feedback", json={"prediction_id": prediction_id, "label": "positive"}, headers=client
            ).json()
            theirs = http.post(
                "/feedback",
                json={"prediction_id": prediction_id, "label": "negative", "source": "env-key-1"},
                headers=other,
            ).json()
            assert mine["feedback_id"] != theirs["feedback_id"]
            assert (mine["source"], theirs["source"], theirs["note"]) == ("env-key-1", "env-key-2", "env-key-1")
            assert http.get(f"/feedback/{mine['feedback_id']}", headers=client).json()["label"] == "positive"
            assert http.get(f"/feedback/{mine['feedback_id']}", headers=other).status_code == 404

            # Only reviewers confirm, resolve and change trust; each decision is audited under their name.
            assert http.post(f"/feedback/{theirs['feedback_id']}/confirm", headers=other).status_code == 403
            text = http.post(
                "/feedback", json={"text": "held until someone looks", "label": "negative"}, headers=other
            ).json()
            assert text["status"] == "pending"
            confirmed = http.post(f"/feedback/{text['feedback_id']}/confirm", headers=rita)
            assert confirmed.status_code == 200, confirmed.text
            assert (confirmed.json()["status"], confirmed.json()["confirmed_by"]) == ("accepted", "rita")
            resolved = http.post(
                f"/feedback/{mine['feedback_id']}/resolve", json={"accept": False, "reason": "off"}, headers=rita
            )
            assert resolved.json()["status"] == "rejected" and resolved.json()["status_reason"] == "reviewer rita: off"
            assert http.post("/feedback/nope/confirm", headers=rita).status_code == 404

            # A quarantine follows the principal: rotating the claimed source does not get round it.
            quarantined = http.post("/sources/env-key-2/quarantine", json={"reason": "spam wave"}, headers=rita)
            assert quarantined.status_code == 200 and quarantined.json()["quarantined"]
            for claimed in ("web", "mobile", "annotation"):
                held = http.post(
                    "/feedback", json={"text": f"spam {claimed}", "label": "positive", "source": claimed}, headers=other
                ).json()
                assert held["status"] == "pending" and "quarantined" in held["status_reason"]
            released = http.post("/sources/env-key-2/release", headers=rita).json()
            assert not released["quarantined"]
            trusted = http.post("/sources/env-key-2/trust", headers=rita).json()
            assert trusted["trusted"]
            assert http.post("/sources/env-key-2/distrust", headers=client).status_code == 403
            assert [(e.actor, e.action, e.target) for e in AuditLog(database).recent(4)] == [
                ("rita", "source.trust", "env-key-2"),
                ("rita", "source.release", "env-key-2"),
                ("rita", "source.quarantine", "env-key-2"),
                ("rita", "feedback.reject", mine["feedback_id"]),
            ]

            # A label a model was trained on is never reopened.
            LabelLedger(database).mark_used([text["feedback_id"]], "v9")
            relabel = {"text": "held until someone looks", "label": "positive"}
            changed = http.post("/feedback", json=relabel, headers=other)
            assert changed.status_code == 409
            assert "was used to train model v9" in changed.json()["detail"]
        finally:
            database.dispose()
