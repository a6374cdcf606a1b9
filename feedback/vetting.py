"""Vetting of untrusted feedback: label-error scores, source reliability, conflicts and quarantine.

Every label is scored against the probabilities of the model that judged its text (cleanlab's
normalized-margin label-quality score; low = the model confidently disagrees). A label is accepted
automatically when a reviewer confirmed it, when its source (the principal that sent it) was trusted by an
operator, or when it is consistent with that evidence and no other label for the same text contradicts it;
everything else waits as ``pending`` with the reason. An untrusted source whose labels often contradict a confident
model is quarantined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

import numpy as np
from cleanlab.rank import get_label_quality_scores
from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from flywheel.access import AuditLog
from flywheel.database import UTCDateTime
from flywheel.events import utcnow
from flywheel.models.feedback import Feedback, FeedbackSource, FeedbackStatus, Prediction
from flywheel.settings import Settings

logger = logging.getLogger(__name__)

#: Columns of ``feedback_source`` read back after each counter update.
SOURCE_COLUMNS = tuple(
    getattr(FeedbackSource, name)
    for name in ("source", "trusted", "quarantined", "quarantine_reason", "scored", "label_issues")
)
#: What vetting needs of a prediction (a full ORM load costs more than the rest of a submit).
_EVIDENCE = select(Prediction.text, Prediction.text_key, Prediction.model_version, Prediction.scores).where(
    col(Prediction.prediction_id) == bindparam("prediction_id")
)
#: Actor named in the audit log for quarantines vetting decides by itself.
VETTING_ACTOR = "vetting"
#: Statuses whose labels count when looking for contradicting labels of the same text.
LIVE_STATUSES = (FeedbackStatus.PENDING, FeedbackStatus.ACCEPTED, FeedbackStatus.USED)


@dataclass(frozen=True)
class LabelScore:
    """How a label looks against one model's probabilities."""

    model_label: str
    model_confidence: float
    label_quality: float
    label_issue: bool


@dataclass(frozen=True, slots=True)
class SourceState:
    """A source's trust, quarantine and counters as read back after its counters changed."""

    source: str
    trusted: bool
    quarantined: bool
    quarantine_reason: str | None
    scored: int
    label_issues: int


class HasTrust(Protocol):
    """Anything naming a source and whether an operator trusts it."""

    @property
    def source(self) -> str: ...

    @property
    def trusted(self) -> bool: ...


def insert_for(session: Session) -> type[sqlite.Insert] | type[postgresql.Insert]:
    """The dialect's INSERT construct, which supports ON CONFLICT on both databases."""
    return postgresql.Insert if session.get_bind().dialect.name == "postgresql" else sqlite.Insert


class Vetter:
    """Scores labels and decides their status inside the caller's transaction."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Statements are built once per dialect: constructing them costs more than running them.
        self._upserts: dict[str, Any] = {}
        self._conflicts = (
            select(Feedback)
            .where(
                col(Feedback.text_key) == bindparam("key"),
                col(Feedback.feedback_id) != bindparam("feedback_id"),
                col(Feedback.status).in_(LIVE_STATUSES),
            )
        )

    def score(self, label: str, scores: dict[str, float]) -> LabelScore:
        """cleanlab label-quality of ``label`` under ``scores``; a label the model does not know scores 0."""
        labels = sorted(scores)
        if label not in scores:
            labels.append(label)
        probs = np.array([[scores.get(name, 0.0) for name in labels]], dtype=np.float64)
        quality = float(
            get_label_quality_scores(np.array([labels.index(label)]), probs, method="normalized_margin")[0]
        )
        model_label = max(scores, key=lambda name: scores[name])
        return LabelScore(
            model_label=model_label,
            model_confidence=float(scores[model_label]),
            label_quality=quality,
            label_issue=quality < self.settings.feedback_label_issue_threshold,
        )

    def is_trusted(self, source: HasTrust) -> bool:
        """Whether a source's labels skip the evidence checks: only when an operator trusted it, never by name."""
        return source.trusted

    def vet(self, session: Session, row: Feedback, now: datetime | None = None) -> None:
        """Attach evidence to ``row``, score it, and set its status, flags and its source's counters."""
        now = now or utcnow()
        # A new row is inserted once, with its final status, when the transaction flushes.
        with session.no_autoflush:
            self._vet(session, row, now)

    def _vet(self, session: Session, row: Feedback, now: datetime) -> None:
        row.updated_at = now
        had_score, had_issue = row.label_quality is not None, row.label_issue
        if row.prediction_id is not None and row.text is None:
            prediction = session.execute(_EVIDENCE, {"prediction_id": row.prediction_id}).first()
            if prediction is None:
                row.status = FeedbackStatus.PENDING
                row.status_reason = f"waiting for prediction {row.prediction_id} to be ingested"
                return
            row.text, row.text_key = prediction.text, prediction.text_key
            row.model_version, row.model_scores = prediction.model_version, dict(prediction.scores)
        elif row.model_scores is None and row.text_key is not None:
            latest = session.exec(
                select(Prediction)
                .where(Prediction.text_key == row.text_key)
                .order_by(col(Prediction.created_at).desc())
                .limit(1)
            ).first()
            if latest is not None:
                row.model_version, row.model_scores = latest.model_version, dict(latest.scores)

        scored = None
        # A model has no evidence about a label it has no output for (one an admin added since): not an error.
        new_label = bool(row.model_scores) and row.label not in (row.model_scores or {})
        if row.model_scores and not new_label:
            scored = self.score(row.label, row.model_scores)
            row.model_label, row.model_confidence = scored.model_label, scored.model_confidence
            row.label_quality, row.label_issue = scored.label_quality, scored.label_issue
        else:
            row.model_label = row.model_confidence = row.label_quality = None
            row.label_issue = False

        source = self.source_state(
            session,
            row.source,
            scored_delta=int(scored is not None) - int(had_score),
            issue_delta=int(row.label_issue) - int(had_issue),
            now=now,
        )
        trusted = self.is_trusted(source)
        if row.label_issue and not trusted and not source.quarantined:
            source = self._maybe_quarantine(session, source, now)
        conflicting = self._mark_conflicts(session, row, now)

        if row.confirmed_by is not None:
            # A reviewer looked at this very label: later evidence is attached, but the verdict stands.
            status, reason = FeedbackStatus.ACCEPTED, row.status_reason
        elif source.quarantined and not trusted:
            status, reason = FeedbackStatus.PENDING, f"source {row.source!r} is quarantined: {source.quarantine_reason}"
        elif trusted:
            status, reason = FeedbackStatus.ACCEPTED, f"trusted source {row.source!r}"
        elif conflicting:
            status, reason = FeedbackStatus.PENDING, f"conflicting labels for this text: {conflicting}"
        elif new_label:
            status = FeedbackStatus.PENDING
            reason = f"model {row.model_version} has no output for the new label {row.label!r}: a reviewer confirms it"
        elif scored is None:
            status, reason = FeedbackStatus.PENDING, "waiting for model evidence (`flywheel feedback vet` scores it)"
        elif scored.label_issue:
            status = FeedbackStatus.PENDING
            reason = (
                f"possible label error: model {row.model_version} gives {scored.model_label!r} "
                f"{scored.model_confidence:.2f} (label quality {scored.label_quality:.3f})"
            )
        else:
            status = FeedbackStatus.ACCEPTED
            reason = f"consistent with model {row.model_version} (label quality {scored.label_quality:.3f})"
        row.status, row.status_reason = status, reason

    def source_state(
        self, session: Session, name: str, scored_delta: int, issue_delta: int, now: datetime
    ) -> SourceState:
        """Create the source on first sight and add to its counters in one statement; returns its current state."""
        dialect = session.get_bind().dialect.name
        upsert = self._upserts.get(dialect)
        if upsert is None:
            insert = insert_for(session)(FeedbackSource).values(
                source=bindparam("name"),
                trusted=False,
                quarantined=False,
                scored=bindparam("scored"),
                label_issues=bindparam("issues"),
                created_at=bindparam("now", type_=UTCDateTime()),
                updated_at=bindparam("now", type_=UTCDateTime()),
            )
            # Relative update: concurrent writers of one source add up instead of overwriting each other.
            upsert = self._upserts[dialect] = insert.on_conflict_do_update(
                index_elements=["source"],
                set_={
                    "scored": FeedbackSource.scored + insert.excluded.scored,
                    "label_issues": FeedbackSource.label_issues + insert.excluded.label_issues,
                    "updated_at": insert.excluded.updated_at,
                },
            ).returning(*SOURCE_COLUMNS)
        state = session.connection().execute(
            upsert, {"name": name, "scored": scored_delta, "issues": issue_delta, "now": now}
        ).one()
        return SourceState(*state)

    def _maybe_quarantine(self, session: Session, source: SourceState, now: datetime) -> SourceState:
        """Quarantine the source if too many of its labels contradict a confident model; returns its state after."""
        settings = self.settings
        if source.scored < settings.feedback_quarantine_min_scored:
            return source
        rate = source.label_issues / source.scored
        # An absolute rate, not one relative to other sources: an attacker with many keys would raise the
        # "others" figure it is compared against. A source honest on a domain the model gets wrong is held too,
        # which is what trust is for: a reviewer trusts it and its labels count.
        if rate < settings.feedback_quarantine_rate:
            return source
        reason = f"{source.label_issues} of {source.scored} labels ({rate:.0%}) contradict a confident model"
        quarantine(session, source.source, reason, now)
        AuditLog.add(session, VETTING_ACTOR, "source.quarantine", source.source, reason=reason)
        logger.warning("quarantined feedback source %r: %s", source.source, reason)
        return replace(source, quarantined=True, quarantine_reason=reason)

    def _mark_conflicts(self, session: Session, row: Feedback, now: datetime) -> str:
        """Flag every live label of the same text when they disagree; returns the other labels, or ''."""
        if row.text_key is None:
            return ""
        others = list(session.exec(self._conflicts, params={"key": row.text_key, "feedback_id": row.feedback_id}))
        disagreeing = [other for other in others if other.label != row.label]
        row.conflict = bool(disagreeing)
        if not disagreeing:
            # All live labels agree now (e.g. this one was changed): clear stale flags.
            for other in others:
                other.conflict = False
            return ""
        sources = {
            s.source: s
            for s in session.exec(
                select(FeedbackSource).where(col(FeedbackSource.source).in_({o.source for o in others}))
            )
        }
        for other in others:
            other.conflict = True
            other_source = sources.get(other.source)
            trusted = other_source is not None and self.is_trusted(other_source)
            if other.status == FeedbackStatus.ACCEPTED and not trusted and other.confirmed_by is None:
                other.status = FeedbackStatus.PENDING
                other.status_reason = f"conflicting labels for this text: {row.label!r} from {row.source!r}"
                other.updated_at = now
        return ", ".join(sorted({f"{o.label!r} from {o.source!r}" for o in disagreeing}))


def quarantine(session: Session, source: str, reason: str, now: datetime) -> int:
    """Quarantine a source and send its accepted, not yet used or confirmed labels back to review; returns how many."""
    # Labels this session vetted but has not written yet (vetting runs without autoflush) must be in the database
    # for the UPDATE below to send them back too.
    session.flush()
    session.execute(
        update(FeedbackSource)
        .where(col(FeedbackSource.source) == source)
        .values(quarantined=True, quarantine_reason=reason[:500], quarantined_at=now, updated_at=now)
        .execution_options(synchronize_session="fetch")
    )
    result = session.execute(
        update(Feedback)
        .where(
            col(Feedback.source) == source,
            col(Feedback.status) == FeedbackStatus.ACCEPTED,
            col(Feedback.confirmed_by).is_(None),
        )
        .values(status=FeedbackStatus.PENDING, status_reason=f"source quarantined: {reason}"[:500], updated_at=now)
        .execution_options(synchronize_session="fetch")
    )
    return int(getattr(result, "rowcount", 0) or 0)
