"""A label the model lacks is refused and counted until an admin allows it with ``flywheel labels add``; on both
databases, through the in-process app and the real command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.label_set import MAX_REFUSED_NAMES, OTHER_NAMES, LabelSet, UnknownLabelError
from flywheel.models.access import AuditEntry
from flywheel.models.feedback import Feedback
from flywheel.models.labels import LabelCreate
from tests.conftest import app_client, copy_home, run_cli, scratch_database_url

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with scratch_database_url(request.param, tmp_path) as url:
        env = {
            **copy_home(trained_home, tmp_path / "home"),
            "FLYWHEEL_DATABASE_URL": url,
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0",
        }
        with app_client(env) as client:
            yield client, env


def stats(env: dict[str, str]) -> dict[str, object]:
    result = run_cli(env, "feedback", "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_unknown_label_is_refused_and_counted_until_an_admin_adds_it(served: tuple[TestClient, dict[str, str]]) -> None:
    client, env = served
    for text in ("rates held steady", "the board meets on monday"):
        refused = client.post("/feedback", json={"text": text, "label": "neutral"})
        assert refused.status_code == 422
        assert "unknown label 'neutral'" in refused.json()["detail"]
        assert "flywheel labels add NAME" in refused.json()["detail"]
    assert client.post("/feedback", json={"text": "x", "label": "neutrall"}).status_code == 422
    assert stats(env)["refused_labels"] == {"neutral": 2, "neutrall": 1}
    assert stats(env)["feedback"] == 0, "a refused label stores nothing"
    # A label the model has needs no trip to the label table, and is stored as before.
    assert client.post("/feedback", json={"text": "a great film", "label": "positive"}).status_code == 202

    added = run_cli(env, "labels", "add", "neutral", "--note", "three-way sentiment", "--as", "ops-anna")
    assert added.returncode == 0, added.stderr
    assert "label 'neutral' allowed" in added.stdout
    assert "already allowed" in run_cli(env, "labels", "add", "neutral").stdout

    stored = client.post("/feedback", json={"text": "rates held steady", "label": "neutral"})
    assert stored.status_code == 202, stored.text
    # No model can vouch for a label it has no output for: an untrusted label waits for a reviewer.
    assert stored.json()["status"] == "pending"
    listed = json.loads(run_cli(env, "labels", "list", "--json").stdout)
    assert listed["champion"] == ["negative", "positive"]
    assert [(label["name"], label["added_by"], label["note"]) for label in listed["added"]] == [
        ("neutral", "ops-anna", "three-way sentiment")
    ]
    assert listed["refused"] == {"neutral": 2, "neutrall": 1}
    table = run_cli(env, "feedback", "stats").stdout
    assert "refused labels" in table and "neutrall" in table

    database = Database(env["FLYWHEEL_DATABASE_URL"]).start()
    try:
        with database.read_session() as session:
            audit = session.query(AuditEntry).filter(AuditEntry.action == "label.add").all()
            assert [(entry.actor, entry.target) for entry in audit] == [("ops-anna", "neutral")]
            assert session.query(Feedback).filter(Feedback.label == "neutral").count() == 1
    finally:
        database.dispose()


def test_a_flood_of_invented_names_shares_one_row(served: tuple[TestClient, dict[str, str]]) -> None:
    client, env = served
    for i in range(MAX_REFUSED_NAMES + 5):
        assert client.post("/feedback", json={"text": "t", "label": f"invented-{i}"}).status_code == 422
    refused = stats(env)["refused_labels"]
    assert isinstance(refused, dict)
    assert len(refused) == MAX_REFUSED_NAMES + 1
    assert refused[OTHER_NAMES] == 5


def test_label_names_are_checked(tmp_path: Path) -> None:
    with scratch_database_url("sqlite", tmp_path) as url:
        database = Database(url).start()
    try:
        labels = LabelSet(database)
        with pytest.raises(UnknownLabelError, match="invalid label name"):
            labels.add(LabelCreate(name="   "), added_by="cli")
        with pytest.raises(UnknownLabelError, match="invalid label name"):
            labels.add(LabelCreate(name="bad\nname"), added_by="cli")
        label, new = labels.add(LabelCreate(name=" refund "), added_by="cli")
        assert (label.name, new) == ("refund", True)
        assert labels.added_names() == ["refund"]
    finally:
        database.dispose()
