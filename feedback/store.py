"""The feedback store: predictions from the log, feedback and its vetting, and the rows retraining reads."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import ColumnElement, String, any_, bindparam, delete, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from feedback.decisions import Decisions, FeedbackConflictError, FeedbackNotFoundError
from feedback.ratelimit import window_start
from feedback.vetting import Vetter, insert_for
from flywheel.access import ANONYMOUS
from flywheel.database import Database
from flywheel.events import FeedbackEvent, new_id, utcnow
from flywheel.label_set import LabelSet, UnknownLabelError
from flywheel.models.feedback import (
    Feedback,
    FeedbackCreate,
    FeedbackPublic,
    FeedbackStatus,
    Prediction,
    RateWindow,
    check_source,
)
from flywheel.settings import Settings
from flywheel.text import text_key

logger = logging.getLogger(__name__)

#: The existing label of a source for a prediction, or for a bare text (built once: construction is costly).
_BY_PREDICTION = select(Feedback).where(
    col(Feedback.source) == bindparam("source"), col(Feedback.prediction_id) == bindparam("target")
)
_BY_TEXT = select(Feedback).where(
    col(Feedback.source) == bindparam("source"),
    col(Feedback.prediction_id).is_(None),
    col(Feedback.text_key) == bindparam("target"),
)

_INSERT_FEEDBACK = sa_insert(Feedback)
_FEEDBACK_FIELDS = tuple(Feedback.model_fields)


class IngestResult(BaseModel):
    """What one ingested batch did."""

    received: int
    inserted: int
    joined: int


class ImportResult(BaseModel):
    """What an annotation import did."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    #: Rows whose earlier label was already used for training: kept as they were.
    used: int = 0


def one_of(column: Any, values: list[str], postgres: bool) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL as ``= ANY(array)``, one parameter instead of hundreds to parse."""
    if postgres:
        return column == any_(bindparam(None, values, type_=ARRAY(String)))
    return column.in_(values)


def feedback_event(saved: FeedbackPublic) -> FeedbackEvent:
    """The ``flywheel.feedback`` event announcing a stored label."""
    return FeedbackEvent(
        feedback_id=saved.feedback_id,
        prediction_id=saved.prediction_id,
        text=saved.text,
        label=saved.label,
        source=saved.source,
        comment=saved.comment,
        status=saved.status.value,
        note=saved.note,
    )


def open_store(settings: Settings) -> FeedbackStore:
    """Connect to the configured database, migrate it, and return a store on it."""
    return FeedbackStore(Database.from_settings(settings).start(), settings)


class FeedbackStore(Decisions):
    """Reads and writes predictions and feedback; every write vets the feedback it touches."""

    def __init__(
        self,
        database: Database,
        settings: Settings,
        vetter: Vetter | None = None,
        model_labels: Callable[[], Collection[str] | None] | None = None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.vetter = vetter or Vetter(settings)
        #: The serving model's labels: labels outside them (and the added ones) are refused. None: no check.
        self.model_labels = model_labels or (lambda: None)

    # Feedback from people and annotation teams

    def submit(
        self, create: FeedbackCreate, principal: str = ANONYMOUS, now: datetime | None = None
    ) -> FeedbackPublic:
        """Store (or update, for the same prediction or text and principal) one label of ``principal`` and vet it.

        The body's ``source`` is kept as the label's note; the source is always ``principal``. A label the model
        lacks and no admin added is refused with UnknownLabelError, and the refusal is counted.
        """
        for attempt in range(3):
            try:
                with self.database.session() as session:
                    try:
                        row, _ = self._upsert(session, create, principal, now or utcnow())
                    except UnknownLabelError as exc:
                        # Raised once the transaction has committed the refusal's count.
                        refused = exc
                    else:
                        return FeedbackPublic.model_validate(row)
                raise refused
            except IntegrityError:
                # A concurrent submit inserted the same (prediction, source) first: retry as an update.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def submit_many(
        self, items: Sequence[tuple[FeedbackCreate, str]]
    ) -> list[FeedbackPublic | FeedbackConflictError | UnknownLabelError]:
        """Store ``(label, principal)`` items as ``submit`` stores each, in one transaction, in their order.

        Returns each item's saved row, or the refusal (FeedbackConflictError or UnknownLabelError, raised before
        anything of it but the refusal's count was written) that fails it alone. Any other error rolls the whole
        transaction back and is raised: the caller stores the items one by one to learn which of them is bad (see
        ``feedback.submissions``).
        """
        outcomes: list[FeedbackPublic | FeedbackConflictError | UnknownLabelError] = []
        with self.database.session() as session:
            for create, principal in items:
                try:
                    row, _ = self._upsert(session, create, principal, utcnow())
                except (FeedbackConflictError, UnknownLabelError) as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(FeedbackPublic.model_validate(row))
        return outcomes

    def _upsert(
        self, session: Session, create: FeedbackCreate, principal: str, now: datetime
    ) -> tuple[Feedback, str]:
        LabelSet.check_in(session, create.label, self.model_labels(), now)
        key = text_key(create.text) if create.text is not None else None
        if create.prediction_id is not None:
            row = session.exec(_BY_PREDICTION, params={"source": principal, "target": create.prediction_id}).first()
        else:
            row = session.exec(_BY_TEXT, params={"source": principal, "target": key}).first()
        if row is not None and row.status == FeedbackStatus.USED:
            if (row.label, row.comment, row.note) == (create.label, create.comment, create.source):
                return row, "unchanged"
            # A model learned from it: changing it now would rewrite the record of what that model was taught.
            raise FeedbackConflictError(
                f"{principal}'s label for this {'prediction' if create.prediction_id else 'text'} "
                f"({row.feedback_id}) was used to train model {row.used_by_version} and cannot be changed"
            )
        if row is None:
            row = Feedback(
                feedback_id=new_id(),
                prediction_id=create.prediction_id,
                text=create.text,
                text_key=key,
                label=create.label,
                source=principal,
                note=create.source,
                comment=create.comment,
                created_at=now,
                updated_at=now,
            )
            self.vetter.vet(session, row, now)
            # A Core insert of the finished row skips the ORM unit of work: this is the hot path of POST /feedback.
            session.connection().execute(_INSERT_FEEDBACK, {name: getattr(row, name) for name in _FEEDBACK_FIELDS})
            outcome = "created"
        elif row.label != create.label:
            # A reviewer confirmed the old label, not this one.
            row.label, row.comment, row.note, row.confirmed_by = create.label, create.comment, create.source, None
            self.vetter.vet(session, row, now)
            outcome = "updated"
        else:
            outcome = "unchanged" if (row.comment, row.note) == (create.comment, create.source) else "updated"
            row.comment, row.note, row.updated_at = create.comment, create.source, now
        return row, outcome

    def get(self, feedback_id: str) -> FeedbackPublic:
        """One piece of feedback, or FeedbackNotFoundError."""
        with self.database.read_session() as session:
            row = session.get(Feedback, feedback_id)
            if row is None:
                raise FeedbackNotFoundError(f"no feedback with id {feedback_id!r}")
            return FeedbackPublic.model_validate(row)

    def import_labels(
        self,
        items: Iterable[tuple[str, str]],
        source: str,
        on_saved: Callable[[FeedbackPublic], None] | None = None,
        chunk: int = 500,
    ) -> ImportResult:
        """Store ``(text, label)`` pairs as labels of principal ``source``; importing the same file again changes
        nothing, and labels already used for training are kept as they were.

        ``on_saved`` sees each created or updated row once its chunk is committed.
        """
        check_source(source)
        result = ImportResult()
        batch: list[FeedbackCreate] = []

        def flush() -> None:
            saved = []
            with self.database.session() as session:
                now = utcnow()
                for create in batch:
                    try:
                        row, outcome = self._upsert(session, create, source, now)
                    except FeedbackConflictError:
                        # Refused before anything was written: the rest of the chunk goes on.
                        result.used += 1
                        continue
                    setattr(result, outcome, getattr(result, outcome) + 1)
                    if outcome != "unchanged":
                        saved.append(FeedbackPublic.model_validate(row))
            batch.clear()
            if on_saved is not None:
                for public in saved:
                    on_saved(public)

        for text, label in items:
            batch.append(FeedbackCreate(text=text, label=label))
            if len(batch) >= chunk:
                flush()
        if batch:
            flush()
        return result

    # Predictions from the Kafka log

    def ingest(self, rows: Sequence[dict[str, Any]]) -> IngestResult:
        """Insert prediction rows (duplicates ignored) and vet the feedback that was waiting for them."""
        unique = list({row["prediction_id"]: row for row in rows}.values())
        if not unique:
            return IngestResult(received=0, inserted=0, joined=0)
        ids = [row["prediction_id"] for row in unique]
        keys = list({row["text_key"] for row in unique})
        with self.database.session() as session:
            postgres = session.get_bind().dialect.name == "postgresql"
            existing = select(Prediction.prediction_id).where(one_of(Prediction.prediction_id, ids, postgres))
            known = set(session.exec(existing))
            fresh = [row for row in unique if row["prediction_id"] not in known]
            if fresh:
                # Plain executemany (no RETURNING) lets the driver pipeline the rows: several times faster on
                # PostgreSQL. ON CONFLICT still guards against a concurrent writer of the same ids.
                insert = insert_for(session)
                session.connection().execute(
                    insert(Prediction).on_conflict_do_nothing(index_elements=["prediction_id"]), fresh
                )
            waiting = list(
                session.exec(
                    select(Feedback).where(
                        one_of(Feedback.prediction_id, ids, postgres),
                        col(Feedback.text).is_(None),
                        col(Feedback.status) != FeedbackStatus.USED,
                    )
                )
            )
            # Bare-text labels still without evidence can be judged by this prediction's scores.
            waiting += session.exec(
                select(Feedback).where(
                    one_of(Feedback.text_key, keys, postgres),
                    col(Feedback.prediction_id).is_(None),
                    col(Feedback.model_scores).is_(None),
                    col(Feedback.status) == FeedbackStatus.PENDING,
                )
            )
            now = utcnow()
            for row in waiting:
                self.vetter.vet(session, row, now)
        if waiting:
            logger.info("joined %d waiting feedback rows to new predictions", len(waiting))
        return IngestResult(received=len(rows), inserted=len(fresh), joined=len(waiting))

    def expire_orphans(self, now: datetime | None = None) -> int:
        """Reject feedback whose prediction did not arrive within the grace period; returns how many."""
        now = now or utcnow()
        grace = self.settings.feedback_grace_seconds
        with self.database.session() as session:
            result = session.execute(
                update(Feedback)
                .where(
                    col(Feedback.prediction_id).is_not(None),
                    col(Feedback.text).is_(None),
                    col(Feedback.status) == FeedbackStatus.PENDING,
                    col(Feedback.created_at) < now - timedelta(seconds=grace),
                )
                .values(
                    status=FeedbackStatus.REJECTED,
                    status_reason=f"prediction never arrived within the {grace:g}s grace period",
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        expired = int(getattr(result, "rowcount", 0) or 0)
        if expired:
            logger.warning("rejected %d feedback rows whose prediction never arrived", expired)
        return expired

    # Evidence

    def awaiting_evidence(self, limit: int = 1000) -> list[tuple[str, str]]:
        """``(feedback_id, text)`` of pending bare-text labels no model has judged yet."""
        with self.database.read_session() as session:
            rows = session.exec(
                select(Feedback.feedback_id, Feedback.text).where(
                    col(Feedback.status) == FeedbackStatus.PENDING,
                    col(Feedback.model_scores).is_(None),
                    col(Feedback.text).is_not(None),
                ).limit(limit)
            )
            return [(feedback_id, text or "") for feedback_id, text in rows]

    def attach_evidence(self, model_version: str, scores: dict[str, dict[str, float]]) -> int:
        """Vet labels against ``model_version``'s probabilities (feedback id -> label -> probability)."""
        with self.database.session() as session:
            now = utcnow()
            rows = session.exec(select(Feedback).where(col(Feedback.feedback_id).in_(list(scores))))
            count = 0
            for row in rows:
                row.model_version, row.model_scores = model_version, scores[row.feedback_id]
                self.vetter.vet(session, row, now)
                count += 1
            return count

    # Housekeeping

    def forget_rate_windows(self, now: datetime | None = None) -> int:
        """Delete rate-limit windows before the current one (they limit nothing any more); returns how many."""
        with self.database.session() as session:
            result = session.execute(
                delete(RateWindow)
                .where(col(RateWindow.window_start) < window_start(now or utcnow()))
                .execution_options(synchronize_session=False)
            )
        return int(getattr(result, "rowcount", 0) or 0)

    def export(self, status: FeedbackStatus | None = None, batch: int = 1000) -> Iterator[FeedbackPublic]:
        """Every piece of feedback (optionally of one status), in creation order, streamed in batches."""
        after = ""
        while True:
            with self.database.read_session() as session:
                query = select(Feedback).where(col(Feedback.feedback_id) > after)
                if status is not None:
                    query = query.where(col(Feedback.status) == status)
                rows = list(session.exec(query.order_by(col(Feedback.feedback_id)).limit(batch)))
            if not rows:
                return
            for row in rows:
                yield FeedbackPublic.model_validate(row)
            after = rows[-1].feedback_id
