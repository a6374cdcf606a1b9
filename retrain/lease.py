"""A lease row in the Flywheel database that lets exactly one worker retrain at a time."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import or_, update
from sqlmodel import Session, col

from flywheel.database import Database
from flywheel.errors import FlywheelError
from flywheel.events import new_id, utcnow
from flywheel.models.retrain import RetrainLease

logger = logging.getLogger(__name__)

LEASE_NAME = "retrain"


class LeaseLostError(FlywheelError):
    """This worker no longer holds the retrain lease, so another may be retraining: it must not promote."""


def worker_identity() -> str:
    """Host, process and a random suffix: unique even for two workers in one process."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[-8:]}"


class RetrainLock:
    """Acquire-or-fail lease with a heartbeat; a holder that dies loses it when the lease expires."""

    def __init__(self, database: Database, lease_seconds: float, holder: str | None = None) -> None:
        self.database = database
        self.lease = timedelta(seconds=lease_seconds)
        self.holder = holder or worker_identity()

    def acquire(self) -> bool:
        """Take the lease if it is free or expired; an atomic conditional UPDATE on both databases."""
        now = utcnow()
        with self.database.session() as session:
            result = session.execute(
                update(RetrainLease)
                .where(
                    col(RetrainLease.name) == LEASE_NAME,
                    or_(
                        col(RetrainLease.holder).is_(None),
                        col(RetrainLease.expires_at) < now,
                        col(RetrainLease.holder) == self.holder,
                    ),
                )
                .values(holder=self.holder, expires_at=now + self.lease)
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(result, "rowcount", 0))

    def renew(self) -> bool:
        """Extend the lease; False when another worker took it over."""
        with self.database.session() as session:
            result = session.execute(
                update(RetrainLease)
                .where(col(RetrainLease.name) == LEASE_NAME, col(RetrainLease.holder) == self.holder)
                .values(expires_at=utcnow() + self.lease)
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(result, "rowcount", 0))

    def confirm(self, session: Session) -> None:
        """Extend the lease inside the caller's transaction, or LeaseLostError when another worker holds it now.

        The database orders this UPDATE against any other worker's acquire: once it returns, no one else can take
        the lease for ``lease_seconds``, so a step done right after it (a promotion) is done by the only holder.
        """
        result = session.execute(
            update(RetrainLease)
            .where(col(RetrainLease.name) == LEASE_NAME, col(RetrainLease.holder) == self.holder)
            .values(expires_at=utcnow() + self.lease)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0):
            return
        row = session.get(RetrainLease, LEASE_NAME)
        now_held = row.holder if row is not None and row.holder else "nobody"
        raise LeaseLostError(
            f"worker {self.holder} lost the retrain lease (held by {now_held} now): it was not renewed within "
            f"{self.lease.total_seconds():g} s (FLYWHEEL_RETRAIN_LEASE_SECONDS), e.g. during a database stall, so "
            "another worker may be retraining; this run's challenger was not promoted"
        )

    def release(self) -> None:
        """Give the lease back."""
        with self.database.session() as session:
            session.execute(
                update(RetrainLease)
                .where(col(RetrainLease.name) == LEASE_NAME, col(RetrainLease.holder) == self.holder)
                .values(holder=None, expires_at=None)
                .execution_options(synchronize_session=False)
            )

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renew the lease in the background while the block runs, then release it."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease.total_seconds() / 3):
                try:
                    if not self.renew():
                        logger.error("retrain lease was taken over by another worker")
                except Exception:
                    logger.exception("could not renew the retrain lease")

        thread = threading.Thread(target=beat, name="retrain-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release()
