"""The Flywheel database: `upgrade` applies the migrations once, `start` checks the schema, on SQLite and
PostgreSQL, and a clear error when it is down."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlmodel import SQLModel

import flywheel.models  # noqa: F401  (every table on SQLModel.metadata)
from flywheel.database import Database, DatabaseError
from flywheel.models.feedback import Feedback
from tests.conftest import free_port

# The scheduler's table too: made by a migration, so workers started together never race to create it.
TABLES = {"prediction", "feedback", "feedback_source", "apscheduler_jobs"}


def test_upgrade_applies_migrations_that_match_the_models(database_url: str) -> None:
    database = Database(database_url).upgrade()
    try:
        with database.engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) >= TABLES
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, SQLModel.metadata) == []
            heads = set(ScriptDirectory.from_config(database.alembic_config()).get_heads())
            assert set(context.get_current_heads()) == heads
        # Starting a process on the migrated database passes its schema check; a second upgrade is a no-op.
        database.start()
        database.upgrade()
    finally:
        database.dispose()


def test_migrations_downgrade_to_nothing_and_back(database_url: str) -> None:
    database = Database(database_url).upgrade()
    try:
        database.downgrade("base")
        with database.engine.connect() as connection:
            assert not TABLES & set(inspect(connection).get_table_names())
        database.migrate()
        with database.engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) >= TABLES
    finally:
        database.dispose()


def test_start_refuses_an_unmigrated_database_and_names_the_command(database_url: str) -> None:
    database = Database(database_url)
    try:
        with pytest.raises(DatabaseError) as failure:
            database.start()
        assert "run `flywheel db upgrade` first" in str(failure.value)
        assert "no tables" in str(failure.value)
        database.upgrade()
        database.downgrade("feedback_0001")
        with pytest.raises(DatabaseError, match="is at schema feedback_0001"):
            database.start()
    finally:
        database.dispose()


def test_concurrent_upgrades_migrate_once(database_url: str) -> None:
    databases = [Database(database_url) for _ in range(3)]
    errors: list[BaseException] = []

    def start(database: Database) -> None:
        try:
            database.upgrade()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(database,)) for database in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for database in databases:
        database.dispose()
    assert errors == []


def test_times_come_back_aware_in_utc(database_url: str) -> None:
    database = Database(database_url).upgrade()
    created = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    try:
        with database.session() as session:
            session.add(Feedback(feedback_id="f1", text="x", label="a", source="s", created_at=created))
        with database.read_session() as session:
            row = session.get(Feedback, "f1")
            assert row is not None
            assert row.created_at == created
            assert row.created_at.tzinfo == UTC
    finally:
        database.dispose()


def test_unreachable_database_fails_with_an_actionable_message() -> None:
    database = Database(f"postgresql://flywheel:secret@127.0.0.1:{free_port()}/flywheel", ready_timeout=1)
    with pytest.raises(DatabaseError) as failure:
        database.start()
    message = str(failure.value)
    assert "is not reachable after 1s" in message
    assert "FLYWHEEL_DATABASE_URL" in message
    assert "secret" not in message
