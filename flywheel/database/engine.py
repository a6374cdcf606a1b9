"""The Flywheel database: one engine per process, sessions, a readiness check, and the schema version check.

One database and one migration tree (``flywheel/database/migrations``) serve every package; the tables are the
SQLModel models in ``flywheel.models``. ``flywheel db upgrade`` (also run by ``flywheel up`` and compose's ``init``
job) applies the migrations, once, before anything starts; every other process calls ``Database.start()``, which
only checks that the schema is at head and names that command when it is not. To add a table, add its model to a
module of ``flywheel.models`` and a revision to ``migrations/versions`` whose ``down_revision`` is the current head,
named ``<package>_<nnnn>_<what>.py`` with ``revision = "<package>_<nnnn>"``; generate one with
``alembic -c flywheel/database/alembic.ini revision --autogenerate -m "..."`` and keep it working on SQLite (batch
mode is on) and PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_before_delay, wait_exponential

from flywheel.errors import FlywheelError
from flywheel.retry import failure
from flywheel.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
ALEMBIC_INI = Path(__file__).parent / "alembic.ini"
#: How long a SQLite writer waits for another process's write lock; kept below the ingest consumer's poll
#: interval so a locked database surfaces as a retryable error instead of silently stalling the consumer.
SQLITE_BUSY_TIMEOUT_MS = 2000
#: Key of the PostgreSQL advisory lock that serialises concurrent migrators (service workers, ingest).
_MIGRATION_LOCK_KEY = 0x464C5957


class DatabaseError(FlywheelError):
    """The database cannot be reached or migrated."""


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
        """Wait until the database answers and check that its schema is at head; call once at startup."""
        self.wait_until_ready()
        self.check_schema()
        return self

    def upgrade(self) -> Database:
        """Wait until the database answers, then apply every migration (``flywheel db upgrade``)."""
        self.wait_until_ready()
        self.migrate()
        return self

    def schema_revisions(self) -> tuple[set[str], set[str]]:
        """The revisions the database is at, and the heads of the migration tree this code ships."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        heads = set(ScriptDirectory.from_config(self.alembic_config()).get_heads())
        try:
            with self.engine.connect() as connection:
                current = set(MigrationContext.configure(connection).get_current_heads())
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot read the schema version of {self.display_url}: {_first_line(exc)}") from exc
        return current, heads

    def check_schema(self) -> None:
        """DatabaseError naming ``flywheel db upgrade`` unless the schema is at this code's head."""
        current, heads = self.schema_revisions()
        if current != heads:
            found = ", ".join(sorted(current)) or "no tables"
            raise DatabaseError(
                f"database {self.display_url} is at schema {found}, this Flywheel needs {', '.join(sorted(heads))}: "
                "run `flywheel db upgrade` first"
            )

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Retry ``SELECT 1`` until it succeeds or ``timeout`` seconds pass."""
        limit = self.ready_timeout if timeout is None else timeout

        def ping() -> None:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")

        def waiting(state: RetryCallState) -> None:
            logger.info("waiting for database %s: %s", self.display_url, _first_line(failure(state)))

        retrying = Retrying(
            retry=retry_if_exception_type((DBAPIError, OSError)),
            # 0.1 s, doubling up to 2 s; giving up before a wait that would end past the limit.
            wait=wait_exponential(multiplier=0.1, max=2.0),
            stop=stop_before_delay(limit),
            before_sleep=waiting,
            reraise=True,
        )
        try:
            retrying(ping)
        except (DBAPIError, OSError) as exc:
            raise DatabaseError(
                f"database {self.display_url} is not reachable after {limit:.0f}s "
                f"({_first_line(exc)}): start it or fix FLYWHEEL_DATABASE_URL"
            ) from exc

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


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
