"""Opening the database in the background, so a server starts (and predicts) while the database is down."""

from __future__ import annotations

import logging
import threading

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from flywheel.database.engine import Database, DatabaseError
from flywheel.retry import failure, wait_on
from flywheel.settings import Settings

logger = logging.getLogger(__name__)


class BackgroundDatabase:
    """Opens (and migrates) the database in a thread, retrying with backoff, so a server starts while it is down.

    HTTP routes call ``get()`` per request and answer 503 with its message until the database is ready.
    """

    def __init__(self, settings: Settings, pool_size: int = 10, max_delay: float = 30.0) -> None:
        self.settings = settings
        self.pool_size = pool_size
        self.max_delay = max_delay
        self.error = "still connecting"
        self._database: Database | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._open, name="database-open", daemon=True)

    def start(self) -> BackgroundDatabase:
        """Begin opening; returns at once."""
        self._thread.start()
        return self

    def get(self) -> Database:
        """The started database, or DatabaseError saying why it is not available yet."""
        if self._database is None:
            raise DatabaseError(f"database is not available yet ({self.error}); retry shortly")
        return self._database

    def close(self) -> None:
        """Stop retrying and close the pool."""
        self._stop.set()
        if self._database is not None:
            self._database.dispose()

    def _open(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(DatabaseError),
            # 1 s, doubling up to max_delay, for as long as it takes.
            wait=wait_exponential(multiplier=1.0, max=self.max_delay),
            # close() sets the event, which ends the wait at once; the next attempt then returns without trying.
            sleep=wait_on(self._stop),
            before_sleep=self._retrying,
        )
        database = retrying(self._attempt)
        if database is not None:
            self._database = database
            logger.info("database ready at %s", database.display_url)

    def _attempt(self) -> Database | None:
        """The started database; None once ``close()`` was called."""
        if self._stop.is_set():
            return None
        database = Database.from_settings(self.settings, pool_size=self.pool_size)
        try:
            database.start()
        except DatabaseError as exc:
            database.dispose()
            self.error = str(exc)
            raise
        return database

    def _retrying(self, state: RetryCallState) -> None:
        logger.warning("database unavailable, retrying in %.0fs: %s", state.upcoming_sleep, failure(state))
