"""The feedback store on both databases: idempotent ingestion, joins, grace period, updates, retraining rows."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import func
from sqlmodel import select

from feedback.annotations import write_export
from feedback.decisions import FeedbackConflictError
from feedback.prediction_rows import prediction_row
from feedback.stats import feedback_stats
from feedback.store import FeedbackStore
from flywheel.access import AuditLog
from flywheel.events import new_id, utcnow
from flywheel.labels import LabelLedger
from flywheel.models.feedback import Feedback, FeedbackCreate, FeedbackStatus, Prediction
from tests.feedback.conftest import prediction


def ingest(store: FeedbackStore, *events: object) -> int:
    now = utcnow()
    return store.ingest([prediction_row(event, now) for event in events]).inserted  # type: ignore[arg-type]


def count(store: FeedbackStore, model: type) -> int:
    with store.database.read_session() as session:
        return int(session.exec(select(func.count()).select_from(model)).one())


def test_ingesting_the_same_predictions_twice_keeps_one_row_each(store: FeedbackStore) -> None:
    events = [prediction(f"text number {i}", 0.3 + i / 100) for i in range(20)]
    assert ingest(store, *events) == 20
    assert ingest(store, *events, *events[:5]) == 0
    assert count(store, Prediction) == 20
    with store.database.read_session() as session:
        row = session.get(Prediction, events[3].prediction_id)
        assert row is not None
        assert row.scores == events[3].scores
        assert abs(row.margin - abs(events[3].scores["positive"] - events[3].scores["negative"])) < 1e-9


def test_feedback_on_a_prediction_is_vetted_against_its_scores(store: FeedbackStore) -> None:
    unsure, sure = prediction("it was fine", 0.55), prediction("a wonderful film", 0.98)
    ingest(store, unsure, sure)

    correction = store.submit(FeedbackCreate(prediction_id=unsure.prediction_id, label="negative"), principal="web")
    assert correction.status == FeedbackStatus.ACCEPTED
    assert correction.text == "it was fine"
    assert correction.model_label == "positive"
    assert not correction.label_issue

    doubtful = store.submit(FeedbackCreate(prediction_id=sure.prediction_id, label="negative"), principal="web")
    assert doubtful.status == FeedbackStatus.PENDING
    assert doubtful.label_issue
    assert doubtful.label_quality is not None and doubtful.label_quality < 0.1
    assert "possible label error" in (doubtful.status_reason or "")


def test_same_prediction_and_principal_updates_and_other_principals_keep_their_own_label(
    store: FeedbackStore,
) -> None:
    event = prediction("so so", 0.5)
    ingest(store, event)
    first = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="alice")
    again = store.submit(
        FeedbackCreate(prediction_id=event.prediction_id, label="positive", comment="changed my mind"),
        principal="alice",
    )
    # Claiming alice's name in the body is only a note: bob's label is bob's, and alice's is untouched.
    other = store.submit(
        FeedbackCreate(prediction_id=event.prediction_id, label="negative", source="alice"), principal="bob"
    )
    assert again.feedback_id == first.feedback_id
    assert again.label == "positive" and again.comment == "changed my mind"
    assert other.feedback_id != first.feedback_id
    assert (other.source, other.note, other.label) == ("bob", "alice", "negative")
    assert store.get(first.feedback_id).label == "positive"
    assert count(store, Feedback) == 2


def test_feedback_before_its_prediction_is_joined_when_it_arrives(store: FeedbackStore) -> None:
    event = prediction("arrives late", 0.6)
    early = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="web")
    assert early.status == FeedbackStatus.PENDING
    assert early.text is None
    assert "waiting for prediction" in (early.status_reason or "")

    result = store.ingest([prediction_row(event, utcnow())])
    assert result.joined == 1
    joined = store.get(early.feedback_id)
    assert joined.text == "arrives late"
    assert joined.status == FeedbackStatus.ACCEPTED
    assert joined.model_version == "v1"


def test_feedback_whose_prediction_never_arrives_is_rejected_after_the_grace_period(
    store_factory: Callable[..., FeedbackStore],
) -> None:
    store = store_factory(feedback_grace_seconds=60)
    orphan = store.submit(FeedbackCreate(prediction_id=new_id(), label="positive"), principal="web")
    assert store.expire_orphans(utcnow() + timedelta(seconds=30)) == 0
    assert store.expire_orphans(utcnow() + timedelta(seconds=61)) == 1
    rejected = store.get(orphan.feedback_id)
    assert rejected.status == FeedbackStatus.REJECTED
    assert rejected.status_reason == "prediction never arrived within the 60s grace period"
    assert feedback_stats(store.database, store.vetter).by_status == {"rejected": 1}


def test_bare_text_labels_import_idempotently_and_take_evidence_when_it_appears(store: FeedbackStore) -> None:
    first = store.import_labels([("A great film!", "positive"), ("dull", "negative")], source="crowd")
    assert (first.created, first.updated, first.unchanged) == (2, 0, 0)
    again = store.import_labels([("A great film!", "positive"), ("dull", "positive")], source="crowd")
    assert (again.created, again.updated, again.unchanged) == (0, 1, 1)
    assert count(store, Feedback) == 2

    waiting = {text: feedback_id for feedback_id, text in store.awaiting_evidence()}
    assert set(waiting) == {"A great film!", "dull"}
    # A prediction of the same text (case and punctuation aside) is evidence for the label.
    ingest(store, prediction("a great film", 0.9))
    judged = store.get(waiting["A great film!"])
    assert judged.status == FeedbackStatus.ACCEPTED and judged.model_label == "positive"
    # Labels no prediction covers are scored by the champion through attach_evidence.
    assert store.attach_evidence("v2", {waiting["dull"]: {"negative": 0.97, "positive": 0.03}}) == 1
    dull = store.get(waiting["dull"])
    assert dull.status == FeedbackStatus.PENDING and dull.label_issue and dull.model_version == "v2"


def test_retraining_reads_accepted_labels_and_marks_them_used(store: FeedbackStore) -> None:
    event = prediction("quite nice", 0.52)
    ingest(store, event)
    on_prediction = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="positive"), principal="web")
    # Texts without evidence are accepted only from a trusted source, and trust is granted, never claimed.
    store.set_source("annotation", trusted=True)
    store.import_labels([("terrible", "negative")], source="annotation")
    # Retraining reads what the store wrote through the core's ledger, never through the feedback package.
    ledger = LabelLedger(store.database)
    rows = ledger.training_rows()
    assert {(row.text, row.label) for row in rows} == {("quite nice", "positive"), ("terrible", "negative")}
    assert ledger.count_new(None) == 2

    assert ledger.mark_used([row.feedback_id for row in rows], "v7") == 2
    assert ledger.training_rows() == []
    assert ledger.count_new(None) == 0
    used = store.get(on_prediction.feedback_id)
    assert used.status == FeedbackStatus.USED and used.used_by_version == "v7"

    # A label a model learned from is never reopened: the same label again changes nothing, another is refused.
    same = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="positive"), principal="web")
    assert same.status == FeedbackStatus.USED
    with pytest.raises(FeedbackConflictError, match="was used to train model v7"):
        store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="web")
    reimport = store.import_labels([("terrible", "positive"), ("fresh text", "positive")], source="annotation")
    assert (reimport.created, reimport.used) == (1, 1)
    assert store.get(used.feedback_id).label == "positive"


def test_reviewer_decisions_and_export(store: FeedbackStore) -> None:
    event = prediction("superb", 0.99)
    ingest(store, event)
    doubtful = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="web")
    assert [row.feedback_id for row in store.pending()] == [doubtful.feedback_id]
    resolved = store.resolve(doubtful.feedback_id, accept=False, reason="sarcasm misread")
    assert resolved.status == FeedbackStatus.REJECTED
    assert resolved.status_reason == "reviewer cli: sarcasm misread"

    out = io.StringIO()
    assert write_export(store.export(), out) == 1
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[0]["text"] == "superb"
    assert (rows[0]["label"], rows[0]["source"], rows[0]["status"]) == ("negative", "web", "rejected")
    assert list(rows[0])[:4] == ["text", "label", "source", "status"]


def test_a_reviewer_confirms_a_held_label_and_the_verdict_survives_new_evidence(store: FeedbackStore) -> None:
    event = prediction("brilliant, just brilliant", 0.99)
    ingest(store, event)
    sarcasm = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="web")
    assert sarcasm.status == FeedbackStatus.PENDING and sarcasm.label_issue

    confirmed = store.confirm(sarcasm.feedback_id, reviewer="rita")
    assert (confirmed.status, confirmed.confirmed_by) == (FeedbackStatus.ACCEPTED, "rita")
    # Neither a conflicting label nor a quarantine of its source sends a label a reviewer confirmed back to review.
    store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="positive"), principal="bob")
    store.set_source("web", quarantined=True, reason="spam wave", actor="rita")
    assert store.get(sarcasm.feedback_id).status == FeedbackStatus.ACCEPTED
    audit = [(entry.actor, entry.action, entry.target) for entry in AuditLog(store.database).recent()]
    assert audit == [("rita", "source.quarantine", "web"), ("rita", "feedback.accept", sarcasm.feedback_id)]

    orphan = store.submit(FeedbackCreate(prediction_id=new_id(), label="positive"), principal="web")
    with pytest.raises(FeedbackConflictError, match="waiting for prediction"):
        store.confirm(orphan.feedback_id, reviewer="rita")
