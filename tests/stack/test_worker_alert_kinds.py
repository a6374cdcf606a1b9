"""The worker retrains only on drift alerts and delivers every alert, of either kind and schema version, to the
webhook, through a receiver that fails at first; real broker, database and loopback HTTP receiver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import AlertEvent, AlertKind, Topic
from flywheel.kafka import kafka_admin
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.runner import RetrainRunner
from stack.worker import ALERTS_GROUP, WEBHOOK_GROUP, RetrainWorker
from tests.conftest import free_port, local_metric, scratch_database_url, wait_until
from tests.flywheel.test_alert_events import V1_ALERT
from tests.webhook_receiver import Receiver, webhook_receiver

pytestmark = pytest.mark.slow


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with scratch_database_url("sqlite", tmp_path) as url:
        yield url


def _committed(bootstrap: str, group: str) -> int:
    """A consumer group's committed offset on the alerts topic (-1 before any commit)."""
    admin = kafka_admin(bootstrap)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return max((meta.offset for tp, meta in offsets.items() if tp.topic == Topic.ALERTS.value), default=-1)


def _delivered(receiver: Receiver) -> list[str]:
    return [r.body["alert"]["report_id"] for r in receiver.taken()]


def test_label_share_alerts_queue_no_retrain_and_every_alert_reaches_the_webhook(
    tmp_path: Path, sqlite_url: str
) -> None:
    label_share = AlertEvent(
        kind=AlertKind.LABEL_SHARE, report_id="shares-1", model_version="v", current_rows=500, reference_rows=900,
        label="billing", current_share=0.6, reference_share=0.2, z_score=22.0, examples=["charged twice"],
    )  # fmt: skip
    drift = AlertEvent(report_id="drift-1", model_version="v", drift_score=0.9, current_rows=500, reference_rows=900)
    # The first delivery's two attempts fail, and so does the first attempt of its second try.
    with EmbeddedBroker(port=free_port()) as broker, webhook_receiver(statuses=[503, 502, 503]) as receiver:
        settings = Settings(
            home=tmp_path / "home", database_url=sqlite_url, kafka_bootstrap=broker.bootstrap,
            kafka_retry_interval=0.2, ingest_max_poll_interval_ms=2000, retrain_queue_poll_seconds=3600,
            alert_webhook_url=receiver.url, alert_webhook_timeout=1.0, alert_webhook_attempts=2,
        )  # fmt: skip
        database = Database(sqlite_url)
        runner = RetrainRunner(settings, database, ModelRegistry(settings), progress=False)
        worker = RetrainWorker(settings)
        worker.start()
        publisher = EventPublisher(settings, name="alert-kinds-test").start()
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        try:
            publisher.publish(label_share)
            wait_until(lambda: "did not take alert" in worker.webhook_health().detail, timeout=60,
                       what="the webhook listener showing the failing receiver")  # fmt: skip
            assert local_metric("flywheel_thread_up", thread="alert-webhook") == 0
            publisher.publish(drift)
            wait_until(lambda: _committed(broker.bootstrap, ALERTS_GROUP) == 2, timeout=60,
                       what="the retrain listener acting on both alerts")  # fmt: skip
            assert [run.reason for run in runner.runs()] == ["drift report drift-1"]
            # Only one run is queued at a time: finish this one so the next drift alert has to queue its own.
            with database.session() as session:
                session.connection().exec_driver_sql("UPDATE retrain_run SET status = 'failed'")
            # A drift alert from a version-1 producer, which knew no kinds.
            producer.send(Topic.ALERTS.value, V1_ALERT).get(timeout=10)
            wait_until(lambda: _committed(broker.bootstrap, ALERTS_GROUP) == 3, timeout=60,
                       what="the retrain listener acting on the version-1 alert")  # fmt: skip
            wait_until(lambda: len(receiver.taken()) == 3, timeout=60, what="all three alerts delivered")
            wait_until(lambda: _committed(broker.bootstrap, WEBHOOK_GROUP) == 3, what="the deliveries committed")
            wait_until(lambda: worker.webhook_health().up, what="the webhook listener healthy again")
        finally:
            producer.close()
            publisher.close()
            worker.shutdown()
            database.dispose()

    # Only the drift alerts queued retrains, the version-1 one included.
    assert sorted(run.reason or "" for run in runner.runs()) == ["drift report drift-1", "drift report r-old"]
    # Delivered in order, the failing receiver's answers retried: nothing lost, nothing skipped.
    assert _delivered(receiver) == ["shares-1", "drift-1", "r-old"]
    assert [r.status for r in receiver.received][:4] == [503, 502, 503, 200]
    first = receiver.taken()[0].body
    assert first["alert"]["kind"] == "label_share"
    assert first["alert"]["label"] == "billing"
    assert first["alert"]["examples"] == ["charged twice"]
    assert first["text"] == label_share.describe()
    assert receiver.taken()[2].body["alert"]["kind"] == "drift"
    assert local_metric("flywheel_alert_webhook_deliveries_total", kind="label_share", outcome="failed") >= 1
