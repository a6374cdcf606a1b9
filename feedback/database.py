"""The Flywheel database: engine, sessions, readiness check, and Alembic migrations applied on start.

One database and one migration tree (``feedback/migrations``) serve every package. A package that
needs tables keeps its SQLModel models in ``<package>/models.py``, adds that module to
``MODEL_MODULES`` below (so Alembic autogenerate sees it), and adds a revision to
``feedback/migrations/versions`` whose ``down_revision`` is the current head, named
``<package>_<nnnn>_<what>.py`` with ``revision = "<package>_<nnnn>"``. Generate one with
``alembic -c feedback/alembic.ini revision --autogenerate -m "..."`` and keep it working on SQLite
(batch mode is on) and PostgreSQL. ``Database.start()`` applies every head, so two packages that
branched from the same head still both migrate.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session

from flywheel.errors import FlywheelError
from flywheel.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
ALEMBIC_INI = Path(__file__).parent / "alembic.ini"
#: Modules whose SQLModel tables belong to the Flywheel database; missing ones are skipped.
MODEL_MODULES = ("feedback.models", "monitoring.models", "retrain.models")
#: How long a SQLite writer waits for another process's write lock; kept below the ingest consumer's poll
#: interval so a locked database surfaces as a retryable error instead of silently stalling the consumer.
SQLITE_BUSY_TIMEOUT_MS = 2000
#: Key of the PostgreSQL advisory lock that serialises concurrent migrators (service workers, ingest).
_MIGRATION_LOCK_KEY = 0x464C5957


class DatabaseError(FlywheelError):
    """The database cannot be reached or migrated."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Flywheel stores only timezone-aware times")
        value = value.astimezone(UTC)
        # SQLite keeps no zone: store naive UTC so text comparison orders correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def import_models() -> None:
    """Import every package's table models so ``SQLModel.metadata`` knows all tables."""
    for name in MODEL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def normalize_url(url: str) -> str:
    """SQLAlchemy URL with PostgreSQL pinned to psycopg 3 (the installed driver)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Database:
    """An engine plus the sessions, readiness check and migrations built on it."""

    def __init__(self, url: str, ready_timeout: float = 30.0, pool_size: int = 10) -> None:
        self.url = normalize_url(url)
        self.display_url = make_url(self.url).render_as_string(hide_password=True)
        self.ready_timeout = ready_timeout
        self.is_sqlite = self.url.startswith("sqlite")
        # SQLite allows one writer: writers of this process queue on a lock instead of SQLite's sleepy busy loop.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self.engine = self._create_engine(pool_size)
        self._write_engine = self.engine.execution_options(flywheel_write=True)

    @classmethod
    def from_settings(cls, settings: Settings, pool_size: int = 10) -> Database:
        """The database named by ``FLYWHEEL_DATABASE_URL`` (default: SQLite in the state directory)."""
        return cls(settings.resolved_database_url, ready_timeout=settings.database_ready_timeout, pool_size=pool_size)

    def _create_engine(self, pool_size: int) -> Engine:
        if not self.is_sqlite:
            return create_engine(
                self.url,
                pool_pre_ping=True,
                pool_size=pool_size,
                max_overflow=pool_size,
                connect_args={"connect_timeout": 5},
            )
        database = make_url(self.url).database
        memory = not database or database == ":memory:"
        if not memory:
            Path(database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            self.url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            poolclass=StaticPool if memory else None,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: object) -> None:
            # Take over BEGIN from pysqlite so writers can start with BEGIN IMMEDIATE (below).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            # A deferred transaction that reads, then writes, fails at once when another process wrote meanwhile;
            # IMMEDIATE takes the write lock up front and waits for it under busy_timeout instead.
            immediate = connection.get_execution_options().get("flywheel_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def start(self) -> Database:
        """Wait until the database answers, then apply all migrations; call once at startup."""
        self.wait_until_ready()
        self.migrate()
        return self

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Retry ``SELECT 1`` until it succeeds or ``timeout`` seconds pass."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = 0.1
        while True:
            try:
                with self.engine.connect() as connection:
                    connection.exec_driver_sql("SELECT 1")
                return
            except (DBAPIError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise DatabaseError(
                        f"database {self.display_url} is not reachable after {limit:.0f}s "
                        f"({_first_line(exc)}): start it or fix FLYWHEEL_DATABASE_URL"
                    ) from exc
                logger.info("waiting for database %s: %s", self.display_url, _first_line(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def migrate(self, revision: str = "heads") -> None:
        """Upgrade the schema to ``revision`` (default every head), holding a lock against concurrent migrators."""
        from alembic import command

        try:
            with self._write_engine.begin() as connection:
                if not self.is_sqlite:
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
                config = self.alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"migrating {self.display_url} failed: {_first_line(exc)}") from exc

    def downgrade(self, revision: str) -> None:
        """Downgrade the schema to ``revision`` (``base`` drops every table)."""
        from alembic import command

        with self._write_engine.begin() as connection:
            config = self.alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, revision)

    def alembic_config(self) -> Any:
        """Alembic configuration for this database and the shared migration tree."""
        from alembic.config import Config

        config = Config(str(ALEMBIC_INI))
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return config

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read-write unit of work: committed when the block ends, rolled back on error."""
        if self._write_lock is not None:
            with self._write_lock, Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                yield session
            return
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only session; nothing it does is committed."""
        session = Session(self.engine, expire_on_commit=False)
        try:
            yield session
        finally:
            # close() ends the transaction without expiring loaded objects, so they stay readable afterwards.
            session.close()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


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


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
