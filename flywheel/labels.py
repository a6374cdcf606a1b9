"""The labels retraining may learn from, and the record that a model learned from them.

Which feedback counts as trainable, and which label is trusted, are rules kept here beside the tables: the
``feedback`` package writes labels, the ``retrain`` package reads them through this ledger, and neither imports the
other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import ColumnElement, and_, exists, func, or_, update
from sqlmodel import Session, col, select

from flywheel.access import ANONYMOUS
from flywheel.database import Database
from flywheel.events import utcnow
from flywheel.models.feedback import Feedback, FeedbackSource, FeedbackStatus, Prediction

#: Ids per UPDATE statement when marking labels used (keeps parameter lists small on both databases).
_CHUNK = 500


class TrainingLabel(BaseModel):
    """An accepted label with its text and vetting flags, as retraining consumes it."""

    feedback_id: str
    text: str
    label: str
    #: The principal that sent the label.
    source: str
    created_at: datetime
    label_quality: float | None
    label_issue: bool
    conflict: bool
    #: Its source is trusted or a reviewer confirmed it: only such labels may judge a challenger.
    trusted: bool


def trainable() -> ColumnElement[bool]:
    """Accepted labels whose text is known: what the next retrain may learn from."""
    return and_(col(Feedback.status) == FeedbackStatus.ACCEPTED, col(Feedback.text).is_not(None))


def trusted_label() -> ColumnElement[bool]:
    """Labels a reviewer confirmed, or whose source a reviewer or admin trusts (no source is trusted by default)."""
    source_trusted = exists().where(col(FeedbackSource.source) == col(Feedback.source), col(FeedbackSource.trusted))
    return or_(col(Feedback.confirmed_by).is_not(None), source_trusted)


def counts_as_new() -> ColumnElement[bool]:
    """Labels that may trigger a retrain: anonymous ones only once model evidence or a reviewer vetted them.

    Anyone can send anonymous labels, so without this a flood of them would start retrains at will.
    """
    return or_(
        col(Feedback.source) != ANONYMOUS,
        col(Feedback.label_quality).is_not(None),
        col(Feedback.confirmed_by).is_not(None),
    )


class PseudoLabel(BaseModel):
    """A confident prediction on logged traffic, which self-training may take as a low-weight label."""

    text: str
    label: str
    confidence: float


#: Most predictions one self-training read returns (the most confident first): bounds a retrain's memory.
PSEUDO_LABEL_READ_LIMIT = 50_000


def unlabeled() -> ColumnElement[bool]:
    """Predictions nobody gave feedback on, for the prediction or its text: a person's label always wins."""
    return and_(
        ~exists().where(col(Feedback.prediction_id) == col(Prediction.prediction_id)),
        ~exists().where(col(Feedback.text_key) == col(Prediction.text_key)),
    )


class LabelLedger:
    """Reads trainable labels and marks the ones a model was trained on."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def training_rows(self) -> list[TrainingLabel]:
        """Accepted labels with their texts and trust, oldest first; retraining decides how to treat the flags."""
        query = select(Feedback, trusted_label()).where(trainable()).order_by(col(Feedback.created_at))
        with self.database.read_session() as session:
            return [
                TrainingLabel.model_validate({**row.model_dump(), "trusted": bool(trusted)})
                for row, trusted in session.exec(query)
            ]

    def confident_predictions(self, since: datetime, min_confidence: float) -> list[PseudoLabel]:
        """Predictions logged after ``since`` with at least ``min_confidence`` and no feedback, most confident first,
        one per text."""
        query = (
            select(Prediction.text, Prediction.label, Prediction.confidence, Prediction.text_key)
            .where(col(Prediction.created_at) >= since, col(Prediction.confidence) >= min_confidence, unlabeled())
            .order_by(col(Prediction.confidence).desc(), col(Prediction.prediction_id))
            .limit(PSEUDO_LABEL_READ_LIMIT)
        )
        seen: set[str] = set()
        rows = []
        with self.database.read_session() as session:
            for text, label, confidence, key in session.exec(query):
                if key not in seen:
                    seen.add(key)
                    rows.append(PseudoLabel(text=text, label=label, confidence=confidence))
        return rows

    def count_new(self, since: datetime | None) -> int:
        """Trainable labels created after ``since`` (all of them when it is None) that ``counts_as_new`` admits."""
        query = select(func.count()).where(trainable(), counts_as_new())
        if since is not None:
            query = query.where(col(Feedback.created_at) > since)
        with self.database.read_session() as session:
            return int(session.exec(query).one())

    def mark_used(self, feedback_ids: Sequence[str], version: str) -> int:
        """Record that model ``version`` was trained on these accepted labels; returns how many changed."""
        with self.database.session() as session:
            return self.mark_used_in(session, feedback_ids, version)

    @staticmethod
    def mark_used_in(session: Session, feedback_ids: Sequence[str], version: str) -> int:
        """``mark_used`` inside the caller's transaction, so the mark commits with whatever records the promotion."""
        changed = 0
        for start in range(0, len(feedback_ids), _CHUNK):
            result = session.execute(
                update(Feedback)
                .where(
                    col(Feedback.feedback_id).in_(list(feedback_ids[start : start + _CHUNK])),
                    col(Feedback.status) == FeedbackStatus.ACCEPTED,
                )
                .values(
                    status=FeedbackStatus.USED,
                    used_by_version=version,
                    status_reason=f"used to train {version}",
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            changed += int(getattr(result, "rowcount", 0) or 0)
        return changed

    @staticmethod
    def unmark_in(session: Session, versions: Iterable[str]) -> int:
        """Accept again the labels marked used by ``versions``, models that never became champion, so the next
        retrain learns from them; returns how many changed."""
        changed = 0
        for version in versions:
            result = session.execute(
                update(Feedback)
                .where(col(Feedback.status) == FeedbackStatus.USED, col(Feedback.used_by_version) == version)
                .values(
                    status=FeedbackStatus.ACCEPTED,
                    used_by_version=None,
                    status_reason=f"accepted again: {version} was trained on it but never promoted",
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            changed += int(getattr(result, "rowcount", 0) or 0)
        return changed
