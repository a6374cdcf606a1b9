"""Desk leases: a review item (a text) is worked by one annotator at a time, until their lease expires.

A lease is a ``desk_lease`` row keyed by the item's ``text_key``. Taking one is one transaction of two atomic
statements: an INSERT that does nothing on a conflicting key, then, for an existing row, an UPDATE whose WHERE
accepts only an expired lease or the taker's own. On PostgreSQL a concurrent taker blocks on the row the first one
wrote and re-checks that WHERE once it has committed, so of two annotators racing for one text exactly one gets
it; on SQLite writers are serialised. Each annotator holds at most one lease: taking one drops their others, so
expired rows never pile up (at most one per annotator, overwritten by the next taker).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, or_, update
from sqlmodel import Session, col, select

from feedback.vetting import insert_for
from flywheel.database import Database
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.models.desk import DeskLease, DeskLeasePublic
from flywheel.models.feedback import Prediction


class LeaseTakenError(FlywheelError):
    """Another annotator holds an unexpired lease on the item."""


class ItemGoneError(FlywheelError):
    """The item's prediction is not in the store (never ingested, or deleted by retention or erasure)."""


class Leases:
    """Takes, renews and releases the desk's leases in one database."""

    def __init__(self, database: Database, lease_seconds: float) -> None:
        self.database = database
        self.lease = timedelta(seconds=lease_seconds)

    def take(self, principal: str, prediction_id: str, now: datetime | None = None) -> DeskLeasePublic:
        """Lease the text of ``prediction_id`` to ``principal`` (renewing their own lease on it).

        LeaseTakenError when another annotator's lease on it has not expired; ItemGoneError for an unknown prediction.
        """
        now = now or utcnow()
        with self.database.session() as session:
            key = session.exec(
                select(Prediction.text_key).where(col(Prediction.prediction_id) == prediction_id)
            ).first()
            if key is None:
                raise ItemGoneError(f"prediction {prediction_id!r} is not in the store any more: reload the desk")
            values = {
                "text_key": key,
                "prediction_id": prediction_id,
                "principal": principal,
                "taken_at": now,
                "expires_at": now + self.lease,
            }
            # Core statements on the session's connection: their rowcount is what the database reports (an
            # ORM-enabled INSERT on PostgreSQL reports -1).
            connection = session.connection()
            inserted = connection.execute(
                insert_for(session)(DeskLease).values(**values).on_conflict_do_nothing(index_elements=["text_key"])
            )
            if inserted.rowcount != 1:
                updated = connection.execute(
                    update(DeskLease)
                    .where(
                        col(DeskLease.text_key) == key,
                        or_(col(DeskLease.expires_at) <= now, col(DeskLease.principal) == principal),
                    )
                    .values(**values)
                )
                if updated.rowcount != 1:
                    raise LeaseTakenError(
                        "another annotator is working on this item right now: the desk shows you the next one"
                    )
            connection.execute(
                delete(DeskLease).where(col(DeskLease.principal) == principal, col(DeskLease.text_key) != key)
            )
        return DeskLeasePublic.model_validate(values)

    def held_by(self, principal: str, now: datetime | None = None) -> DeskLeasePublic | None:
        """``principal``'s unexpired lease, if they hold one."""
        with self.database.read_session() as session:
            row = session.exec(
                select(DeskLease)
                .where(col(DeskLease.principal) == principal, col(DeskLease.expires_at) > (now or utcnow()))
                .order_by(col(DeskLease.taken_at).desc())
                .limit(1)
            ).first()
            return None if row is None else DeskLeasePublic.model_validate(row, from_attributes=True)

    @staticmethod
    def release(session: Session, principal: str, text_key: str) -> None:
        """End ``principal``'s lease on ``text_key`` in the caller's transaction (nothing if they hold none)."""
        session.execute(
            delete(DeskLease)
            .where(col(DeskLease.text_key) == text_key, col(DeskLease.principal) == principal)
            .execution_options(synchronize_session=False)
        )
