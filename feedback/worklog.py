"""An annotator's work at the desk: labels given (stored as ``POST /feedback`` stores them), skips, undo, and the
figures the desk shows them (labelled today, their agreement with others and with reviewers' verdicts)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from feedback.decisions import FeedbackConflictError
from feedback.leases import ItemGoneError, Leases, LeaseTakenError
from feedback.store import FeedbackStore
from flywheel.events import utcnow
from flywheel.models.desk import DeskAction, DeskEntry, DeskEntryPublic
from flywheel.models.feedback import Feedback, FeedbackCreate, FeedbackPublic, FeedbackStatus, Prediction

#: Statuses of labels that still say something about their text (a rejected label is no one's view any more).
_STANDING = (FeedbackStatus.PENDING, FeedbackStatus.ACCEPTED, FeedbackStatus.USED)


@dataclass(frozen=True)
class Agreement:
    """How often an annotator's labels agree with other principals' labels of the same texts and with reviewers."""

    agreed: int
    compared: int

    @property
    def rate(self) -> float | None:
        """Share of comparisons that agreed; None before the first one."""
        return self.agreed / self.compared if self.compared else None


@dataclass(frozen=True)
class Undone:
    """A label withdrawn by undo: its entry, and the label it had."""

    entry: DeskEntryPublic
    label: str | None


class Worklog:
    """Records what annotators do at the desk, on one store and its leases."""

    def __init__(self, store: FeedbackStore, leases: Leases) -> None:
        self.store = store
        self.leases = leases

    def label(
        self, principal: str, session_id: str, prediction_id: str, label: str, comment: str | None
    ) -> FeedbackPublic:
        """Store ``principal``'s label of the item as their feedback, then record it and end their lease.

        LeaseTakenError when another annotator holds the item now; the store's refusals (UnknownLabelError,
        FeedbackConflictError) leave the lease as it was.
        """
        lease = self.leases.take(principal, prediction_id)
        saved = self.store.submit(FeedbackCreate(prediction_id=prediction_id, label=label, comment=comment), principal)
        with self.store.database.session() as session:
            session.add(
                DeskEntry(
                    principal=principal,
                    session=session_id,
                    prediction_id=prediction_id,
                    text_key=lease.text_key,
                    action=DeskAction.LABEL,
                    feedback_id=saved.feedback_id,
                )
            )
            Leases.release(session, principal, lease.text_key)
        return saved

    def skip(self, principal: str, session_id: str, prediction_id: str) -> None:
        """Pass on the item: it goes back to the others and is not offered to ``principal`` again."""
        with self.store.database.session() as session:
            key = session.exec(
                select(Prediction.text_key).where(col(Prediction.prediction_id) == prediction_id)
            ).first()
            if key is None:
                raise ItemGoneError(f"prediction {prediction_id!r} is not in the store any more: reload the desk")
            session.add(
                DeskEntry(
                    principal=principal,
                    session=session_id,
                    prediction_id=prediction_id,
                    text_key=key,
                    action=DeskAction.SKIP,
                )
            )
            Leases.release(session, principal, key)

    def undo(self, principal: str, session_id: str) -> Undone | None:
        """Withdraw the last label ``principal`` gave in this session (None when there is none), and lease its item
        back to them so it is shown again.

        FeedbackConflictError when a model was already trained on it: the record of what it learned stays.
        """
        now = utcnow()
        with self.store.database.session() as session:
            entry = session.exec(
                select(DeskEntry)
                .where(
                    col(DeskEntry.principal) == principal,
                    col(DeskEntry.session) == session_id,
                    col(DeskEntry.action) == DeskAction.LABEL,
                )
                .order_by(col(DeskEntry.created_at).desc(), col(DeskEntry.entry_id).desc())
                .limit(1)
            ).first()
            if entry is None:
                return None
            undone = Undone(DeskEntryPublic.model_validate(entry, from_attributes=True), None)
            row = session.get(Feedback, entry.feedback_id) if entry.feedback_id else None
            if row is not None:
                if row.status == FeedbackStatus.USED:
                    raise FeedbackConflictError(
                        f"your label {row.label!r} was already used to train model {row.used_by_version}: "
                        "it cannot be withdrawn"
                    )
                undone = Undone(undone.entry, row.label)
                self._withdraw(session, row, now)
            session.delete(entry)
        # Someone else may have it now, or retention removed it: the withdrawal stands, the desk shows the next item.
        with contextlib.suppress(LeaseTakenError, ItemGoneError):
            self.leases.take(principal, undone.entry.prediction_id)
        return undone

    def _withdraw(self, session: Session, row: Feedback, now: datetime) -> None:
        """Delete a label as if it had never been sent: its source's counters and its text's other labels follow."""
        self.store.vetter.source_state(
            session,
            row.source,
            scored_delta=-int(row.label_quality is not None),
            issue_delta=-int(row.label_issue),
            now=now,
        )
        session.delete(row)
        session.flush()
        if row.text_key is None:
            return
        # The labels it conflicted with may agree among themselves now: their flags and statuses are judged again.
        others = session.exec(
            select(Feedback).where(
                col(Feedback.text_key) == row.text_key,
                col(Feedback.status).in_((FeedbackStatus.PENDING, FeedbackStatus.ACCEPTED)),
            )
        )
        for other in list(others):
            self.store.vetter.vet(session, other, now)

    def labelled_since(self, principal: str, since: datetime) -> int:
        """Labels ``principal`` gave at the desk since ``since`` (undone ones not counted)."""
        with self.store.database.read_session() as session:
            query = select(func.count()).where(
                col(DeskEntry.principal) == principal,
                col(DeskEntry.action) == DeskAction.LABEL,
                col(DeskEntry.created_at) >= since,
            )
            return int(session.exec(query).one())

    def agreement(self, principal: str) -> Agreement:
        """``principal``'s labels against reviewers' verdicts on them and against other principals' standing labels
        of the same texts (every pair one comparison); labels a reviewer decided are compared with the verdict only.
        """
        with self.store.database.read_session() as session:
            mine = select(Feedback).where(col(Feedback.source) == principal).subquery()
            confirmed = col(mine.c.confirmed_by).is_not(None)
            # A reviewer's rejection is recorded as "reviewer NAME: reason" (feedback.decisions).
            overruled = and_(
                col(mine.c.status) == FeedbackStatus.REJECTED, col(mine.c.status_reason).like("reviewer %")
            )
            verdicts = session.exec(
                select(func.count(), func.count().filter(confirmed)).where(confirmed | overruled)
            ).one()
            other = aliased(Feedback)
            peers = session.exec(
                select(func.count(), func.count().filter(col(other.label) == mine.c.label))
                .select_from(mine)
                .join(
                    other,
                    and_(
                        col(other.text_key) == mine.c.text_key,
                        col(other.source) != principal,
                        col(other.status).in_(_STANDING),
                    ),
                )
                .where(col(mine.c.status).in_(_STANDING), ~confirmed)
            ).one()
        return Agreement(agreed=int(verdicts[1]) + int(peers[1]), compared=int(verdicts[0]) + int(peers[0]))
