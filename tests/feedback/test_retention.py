"""Retention and forgetting, on SQLite and PostgreSQL: old unlabelled predictions go, a client can be forgotten
(store, feedback, spill files nobody holds), and the audit log says it happened."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlmodel import col, func, select

from feedback.prediction_rows import prediction_row
from feedback.retention import expire_predictions, forget_client
from feedback.store import FeedbackStore
from flywheel.access import AuditLog
from flywheel.events import utcnow
from flywheel.models.drift import DriftTarget
from flywheel.models.feedback import Feedback, FeedbackCreate, Prediction
from flywheel.spill import Record, SpillFile
from tests.conftest import run_cli
from tests.feedback.conftest import prediction


def count(store: FeedbackStore, model: type, *where: object) -> int:
    with store.database.read_session() as session:
        return int(session.exec(select(func.count()).select_from(model).where(*where)).one())


def test_old_unlabelled_predictions_expire_and_labelled_ones_stay(store: FeedbackStore) -> None:
    now = utcnow()
    old, labelled, fresh = (
        prediction("an old text", 0.9, at=now - timedelta(days=40)),
        prediction("an old labelled text", 0.9, at=now - timedelta(days=40)),
        prediction("a fresh text", 0.9, at=now - timedelta(days=2)),
    )
    store.ingest([prediction_row(event, now) for event in (old, labelled, fresh)])
    store.submit(FeedbackCreate(prediction_id=labelled.prediction_id, label="negative"), principal="alice")
    with store.database.session() as session:
        session.add(DriftTarget(prediction_id=old.prediction_id, report_id="r1", drift_score=0.9))

    assert expire_predictions(store.database, days=30) == 1
    with store.database.read_session() as session:
        left = set(session.exec(select(Prediction.prediction_id)))
    assert left == {labelled.prediction_id, fresh.prediction_id}
    assert count(store, DriftTarget) == 0
    assert expire_predictions(store.database, days=30) == 0


def test_forget_removes_a_clients_rows_and_spilled_events_and_is_audited(
    store: FeedbackStore, tmp_path: Path
) -> None:
    now = utcnow()
    mine = [prediction(f"my text {i}", 0.8) for i in range(3)]
    theirs = prediction("someone else's text", 0.8)
    for event in mine:
        event.client_id = "client-42"
    store.ingest([prediction_row(event, now) for event in (*mine, theirs)])
    store.submit(FeedbackCreate(prediction_id=mine[0].prediction_id, label="negative"), principal="alice")

    spill_dir = tmp_path / "home" / "spill"
    dead = SpillFile.create(spill_dir, "dead")
    spilled = [prediction("spilled mine", 0.7), prediction("spilled theirs", 0.7)]
    spilled[0].client_id = "client-42"
    dead.append(b"".join(Record.of(event).line() for event in spilled))
    dead.close()  # its process died: nobody holds it
    held = SpillFile.create(spill_dir, "alive")  # a running process's file stays out of reach

    gone = forget_client(store.database, tmp_path / "home", "client-42", actor="privacy-officer")

    assert (gone.predictions, gone.feedback, gone.spilled_events, gone.held_spill_files) == (3, 1, 1, 1)
    assert count(store, Prediction, col(Prediction.client_id) == "client-42") == 0
    assert count(store, Prediction) == 1
    assert count(store, Feedback) == 0
    remaining = (spill_dir / dead.path.name).read_bytes()
    assert b"spilled theirs" in remaining and b"spilled mine" not in remaining
    [entry] = AuditLog(store.database).recent(action="client.forget")
    assert (entry.actor, entry.target, entry.detail["predictions"]) == ("privacy-officer", "client-42", 3)
    held.close()


def test_forget_command_reports_what_it_removed(store: FeedbackStore, tmp_path: Path) -> None:
    event = prediction("a text to forget", 0.8)
    event.client_id = "client-7"
    store.ingest([prediction_row(event, utcnow())])
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_DATABASE_URL": store.database.url}
    result = run_cli(env, "forget", "--client-id", "client-7", "--as", "dpo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "forgot client 'client-7': 1 predictions, 0 feedback rows, 0 spilled events"
    assert count(store, Prediction) == 0
