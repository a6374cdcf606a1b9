"""Opening the database in the background, so a server starts (and predicts) while the database is down."""

from __future__ import annotations

import logging
import threading

from flywheel.database.engine import Database, DatabaseError
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
        delay = 1.0
        while not self._stop.is_set():
            database = Database.from_settings(self.settings, pool_size=self.pool_size)
            try:
                database.start()
            except DatabaseError as exc:
                database.dispose()
                self.error = str(exc)
                logger.warning("database unavailable, retrying in %.0fs: %s", delay, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            self._database = database
            logger.info("database ready at %s", database.display_url)
            return
