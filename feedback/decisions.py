"""What reviewers and operators decide: verdicts on labels, trust and quarantine of sources, each one audited.

``FeedbackStore`` carries these methods; they live apart from the store's writes of labels and predictions.
"""

from __future__ import annotations

from sqlmodel import col, select

from feedback.vetting import Vetter, quarantine
from flywheel.access import AuditLog
from flywheel.database import Database
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.models.feedback import (
    Feedback,
    FeedbackPublic,
    FeedbackSource,
    FeedbackSourcePublic,
    FeedbackStatus,
    check_source,
)

#: Actor the audit log names for changes made without naming one: the command line's default.
OPERATOR = "cli"


class FeedbackNotFoundError(FlywheelError):
    """No feedback with the given id."""


class FeedbackConflictError(FlywheelError):
    """A change the label's state does not allow: it was used for training, or its text is not known yet."""


class Decisions:
    """Reviewer verdicts and source trust, for a class with a ``database`` and a ``vetter``."""

    database: Database
    vetter: Vetter

    # Labels

    def pending(self, limit: int = 50) -> list[FeedbackPublic]:
        """Labels waiting for a reviewer, oldest first."""
        with self.database.read_session() as session:
            rows = session.exec(
                select(Feedback)
                .where(col(Feedback.status) == FeedbackStatus.PENDING)
                .order_by(col(Feedback.created_at))
                .limit(limit)
            )
            return [FeedbackPublic.model_validate(row) for row in rows]

    def resolve(self, feedback_id: str, accept: bool, reason: str, reviewer: str = OPERATOR) -> FeedbackPublic:
        """A reviewer's verdict on one label, audited; an accepted label counts as confirmed by ``reviewer``."""
        with self.database.session() as session:
            row = session.get(Feedback, feedback_id)
            if row is None:
                raise FeedbackNotFoundError(f"no feedback with id {feedback_id!r}")
            if row.status == FeedbackStatus.USED:
                raise FeedbackConflictError(f"feedback {feedback_id} was used to train model {row.used_by_version}")
            if accept and row.text is None:
                # Its prediction would re-vet it on arrival, undoing the verdict; and without a text it cannot train.
                raise FeedbackConflictError(
                    f"feedback {feedback_id} is waiting for prediction {row.prediction_id}; decide once it has arrived"
                )
            row.status = FeedbackStatus.ACCEPTED if accept else FeedbackStatus.REJECTED
            row.status_reason = f"reviewer {reviewer}: {reason}"[:500]
            row.confirmed_by = reviewer if accept else None
            row.updated_at = utcnow()
            action = "feedback.accept" if accept else "feedback.reject"
            AuditLog.add(session, reviewer, action, feedback_id, reason=reason)
            session.flush()
            return FeedbackPublic.model_validate(row)

    def confirm(self, feedback_id: str, reviewer: str = OPERATOR) -> FeedbackPublic:
        """A reviewer vouches for a held or untrusted label: accepted, and trusted like a trusted source's."""
        return self.resolve(feedback_id, accept=True, reason="confirmed", reviewer=reviewer)

    # Sources

    def sources(self) -> list[FeedbackSourcePublic]:
        """Every source with its reliability, trust and quarantine state."""
        with self.database.read_session() as session:
            rows = session.exec(select(FeedbackSource).order_by(col(FeedbackSource.source)))
            return [FeedbackSourcePublic.model_validate(row) for row in rows]

    def set_source(
        self,
        name: str,
        trusted: bool | None = None,
        quarantined: bool | None = None,
        reason: str = "operator",
        actor: str = OPERATOR,
    ) -> FeedbackSourcePublic:
        """Trust or distrust a source (a principal, before or after its first label), or quarantine or release it.

        Each change is audited in the same transaction. A change of trust re-vets the source's open labels at once.
        """
        check_source(name)
        with self.database.session() as session:
            now = utcnow()
            # Creates the source on first sight, so a principal can be trusted before it sends anything.
            self.vetter.source_state(session, name, scored_delta=0, issue_delta=0, now=now)
            source = session.get_one(FeedbackSource, name)
            if trusted is not None and trusted != source.trusted:
                source.trusted, source.updated_at = trusted, now
                session.flush()
                AuditLog.add(session, actor, "source.trust" if trusted else "source.distrust", name)
                open_labels = select(Feedback).where(
                    col(Feedback.source) == name,
                    col(Feedback.status).in_((FeedbackStatus.PENDING, FeedbackStatus.ACCEPTED)),
                )
                for row in list(session.exec(open_labels)):
                    self.vetter.vet(session, row, now)
            if quarantined is False and source.quarantined:
                source.quarantined, source.quarantine_reason, source.quarantined_at = False, None, None
                source.updated_at = now
                AuditLog.add(session, actor, "source.release", name)
            elif quarantined is True and not source.quarantined:
                held = quarantine(session, name, reason, now)
                AuditLog.add(session, actor, "source.quarantine", name, reason=reason, labels_held=held)
            session.flush()
            session.refresh(source)
            return FeedbackSourcePublic.model_validate(source)
