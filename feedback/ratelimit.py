"""Per-principal feedback rate limits in fixed one-minute windows, counted in the ``rate_window`` table.

Every service worker and host adds to the same row, so a principal's limit holds however its requests are spread
over workers. One atomic upsert per request both counts it and reads the count back: concurrent requests never
lose an increment, on SQLite or PostgreSQL. The worker's housekeeping deletes past windows
(``FeedbackStore.forget_rate_windows``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam
from sqlmodel import Session, col

from feedback.vetting import insert_for
from flywheel.database import Database, UTCDateTime
from flywheel.events import utcnow
from flywheel.models.access import Role
from flywheel.models.feedback import RateWindow
from flywheel.settings import Settings

WINDOW = timedelta(minutes=1)


def window_start(now: datetime) -> datetime:
    """Start of the one-minute window holding ``now``."""
    return now.replace(second=0, microsecond=0)


class RateLimiter:
    """Counts each principal's feedback requests per window against the limit of its role."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        # Reviewers and admins are not limited: they are few, and confirming labels in bulk is their job.
        self.limits = {
            Role.CLIENT: settings.feedback_rate_limit,
            Role.ANNOTATOR: settings.feedback_rate_limit_annotator,
        }
        # Built once per dialect: constructing the statement costs more than running it.
        self._upserts: dict[str, Any] = {}

    def limit(self, role: Role) -> int:
        """Requests per minute allowed to one principal of ``role``; 0 = no limit."""
        return self.limits.get(role, 0)

    def acquire(self, principal: str, role: Role, now: datetime | None = None) -> float:
        """Count one request of ``principal``: 0 when allowed, else the seconds until its window ends."""
        limit = self.limit(role)
        if limit <= 0:
            return 0.0
        now = now or utcnow()
        start = window_start(now)
        with self.database.session() as session:
            count = session.connection().execute(self._upsert(session), {"principal": principal, "start": start})
            used = int(count.scalar_one())
        if used <= limit:
            return 0.0
        return (start + WINDOW - now).total_seconds()

    def _upsert(self, session: Session) -> Any:
        dialect = session.get_bind().dialect.name
        if dialect not in self._upserts:
            insert = insert_for(session)(RateWindow).values(
                principal=bindparam("principal"), window_start=bindparam("start", type_=UTCDateTime()), count=1
            )
            self._upserts[dialect] = insert.on_conflict_do_update(
                index_elements=["principal", "window_start"], set_={"count": col(RateWindow.count) + 1}
            ).returning(col(RateWindow.count))
        return self._upserts[dialect]

