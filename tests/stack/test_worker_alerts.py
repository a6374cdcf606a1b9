"""The worker's drift-alert listener against a real broker and a real PostgreSQL database that goes away and back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import AlertEvent, Topic
from flywheel.kafka import kafka_admin
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.runner import RetrainRunner
from stack.worker import ALERTS_GROUP, RetrainWorker
from tests.conftest import POSTGRES_ADMIN_URL, free_port, local_metric, scratch_database_url, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture()
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with scratch_database_url("postgresql", tmp_path) as url:
        yield url


def _allow_connections(url: str, allowed: bool) -> None:
    """Open or close the database to new connections; closing also cuts every open one (an outage, for real)."""
    name = make_url(url).database
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def _alert(report_id: str) -> AlertEvent:
    return AlertEvent(
        report_id=report_id, model_version="v", drift_score=0.9, current_rows=500, reference_rows=900
    )


def _committed(bootstrap: str) -> int:
    """The alert listener group's committed offset on the alerts topic (-1 before any commit)."""
    admin = kafka_admin(bootstrap)
    try:
        offsets = admin.list_group_offsets(ALERTS_GROUP).get(ALERTS_GROUP, {})
    finally:
        admin.close()
    return max((meta.offset for tp, meta in offsets.items() if tp.topic == Topic.ALERTS.value), default=-1)


def _reasons(runner: RetrainRunner) -> list[str | None]:
    return [run.reason for run in runner.runs()]


def test_an_alert_during_a_database_outage_is_acted_on_once_it_is_back(tmp_path: Path, postgres_url: str) -> None:
    with EmbeddedBroker(port=free_port()) as broker:
        settings = Settings(
            home=tmp_path / "home", database_url=postgres_url, kafka_bootstrap=broker.bootstrap,
            kafka_retry_interval=0.2, ingest_max_poll_interval_ms=2000, retrain_queue_poll_seconds=3600,
        )
        database = Database(postgres_url)
        runner = RetrainRunner(settings, database, ModelRegistry(settings), progress=False)
        worker = RetrainWorker(settings)
        worker.start()
        publisher = EventPublisher(settings, name="alerts-test").start()
        try:
            publisher.publish(_alert("r1"))
            wait_until(lambda: _reasons(runner) == ["drift report r1"], timeout=60, what="the first alert's run")
            wait_until(lambda: _committed(broker.bootstrap) == 1, what="the first alert's offset committed")
            # Only one run is queued at a time: finish this one so the next alert has to store a new one.
            with database.session() as session:
                session.connection().exec_driver_sql("UPDATE retrain_run SET status = 'failed'")

            _allow_connections(postgres_url, allowed=False)
            try:
                publisher.publish(_alert("r2"))
                wait_until(lambda: "OperationalError" in worker.alerts_health().detail, timeout=60,
                           what="the listener showing the outage")
                assert not worker.alerts_health().up
                assert local_metric("flywheel_thread_up", thread="drift-alerts") == 0
                assert local_metric("flywheel_thread_faults_total", thread="drift-alerts") >= 1
                time.sleep(3)  # several failed attempts, each a fresh consumer re-delivered the alert
                assert _committed(broker.bootstrap) == 1, "the alert's offset waits for its stored request"
            finally:
                _allow_connections(postgres_url, allowed=True)

            wait_until(lambda: "drift report r2" in _reasons(runner), timeout=60, what="the second alert acted on")
            wait_until(lambda: worker.alerts_health().up, what="the listener healthy again")
            wait_until(lambda: _committed(broker.bootstrap) == 2, what="the second alert's offset committed")
            assert local_metric("flywheel_thread_up", thread="drift-alerts") == 1
            assert _reasons(runner).count("drift report r2") == 1
        finally:
            publisher.close()
            worker.shutdown()
            database.dispose()
