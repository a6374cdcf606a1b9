"""The worker: APScheduler jobs (persistent schedule) for retrain checks, drift reports and housekeeping;
queued and drift-triggered retrains; alerts delivered to the webhook; clean shutdown.

The drift-alert listener acts on each alert at least once: its offset is committed only once the retrain request
is stored, and the listener is supervised (``flywheel.supervision``), so a database or broker outage shows as a
fault (``alerts_health()``, ``flywheel_thread_up{thread="drift-alerts"}``) and the alert is acted on when it ends.
Only drift alerts queue retrains; label-share alerts are for people.

With ``FLYWHEEL_ALERT_WEBHOOK_URL`` set, a second listener in a consumer group of its own delivers every alert, of
every kind and producer, to the webhook (``flywheel.webhook``), also at least once: an alert's offset is committed
once the receiver took it, so a receiver that is down delays alerts (``webhook_health()``,
``flywheel_thread_up{thread="alert-webhook"}``) and neither loses them nor holds up retrains.

Every ``FLYWHEEL_CHALLENGER_CHECK_SECONDS`` the worker checks the deployed challenger: a canary worse than the
champion on trusted feedback is withdrawn (``flywheel.deployments``), and a retrain's shadow phase that is due is
decided (``retrain.shadow_phase``); while one is pending no other retrain starts.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC
from types import FrameType

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from feedback.retention import expire_predictions
from feedback.store import FeedbackStore
from flywheel.database import Database
from flywheel.deployments import DeploymentStore
from flywheel.events import AlertEvent, AlertKind, EventDecodeError, Topic, decode
from flywheel.kafka import kafka_consumer
from flywheel.models.retrain import RunTrigger
from flywheel.models.schedule import JOBS_TABLE
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from flywheel.supervision import Health, Supervised, describe
from flywheel.webhook import AlertWebhook, WebhookError
from monitoring.monitor import DriftMonitor
from monitoring.schedule import add_drift_job
from retrain.runner import RetrainRunner
from retrain.shadow_phase import ShadowPhase

logger = logging.getLogger(__name__)

#: The worker whose jobs run in this process; persistent jobs are stored by reference, so they find it here.
_active: RetrainWorker | None = None
ALERTS_GROUP = "flywheel-retrain"
#: Consumer group of the webhook listener: its own offsets, so a slow receiver never holds up retrains.
WEBHOOK_GROUP = "flywheel-alert-webhook"
#: Longest wait, in seconds, between attempts of the alert listener while the database or the broker is away.
ALERT_RETRY_MAX_SECONDS = 10.0
#: Longest pause, in seconds, of the webhook listener after a delivery's every attempt failed, before it tries the
#: same alert again (1 s after the first such failure, doubling).
WEBHOOK_RETRY_MAX_PAUSE_SECONDS = 30.0


def scheduled_retrain() -> None:
    """Job: retrain when any accepted feedback arrived since the last run."""
    _current().scheduled_retrain()


def housekeeping() -> None:
    """Job: orphan feedback past its grace period, old rate windows, predictions past their retention."""
    _current().housekeeping()


def _current() -> RetrainWorker:
    if _active is None:
        raise RuntimeError("no retrain worker is running in this process")
    return _active


class RetrainWorker:
    """Schedules retrain checks and housekeeping, runs queued and drift-triggered retrains, one at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.database: Database | None = None
        self.runner: RetrainRunner | None = None
        self.shadow_phase: ShadowPhase | None = None
        self.store: FeedbackStore | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.publisher: EventPublisher | None = None
        self.webhook: AlertWebhook | None = None
        self._alerts = Supervised(
            "drift-alerts", self._consume_alerts, self.stopping, max_backoff=ALERT_RETRY_MAX_SECONDS
        )
        self._webhook = Supervised("alert-webhook", self._deliver_alerts, self.stopping)

    def start(self) -> None:
        """Connect, migrate, recover dead runs, and start the scheduler and the alert listener."""
        global _active
        # A malformed webhook URL stops the start here, before anything runs.
        self.webhook = AlertWebhook.from_settings(self.settings, stop=self.stopping)
        self.database = Database.from_settings(self.settings).start()
        self.store = FeedbackStore(self.database, self.settings)
        registry = ModelRegistry(self.settings)
        self.runner = RetrainRunner(self.settings, self.database, registry, stop=self.stopping, progress=False)
        # A lease of its own: its decisions must not renew, or release, the lease of a retrain running beside them.
        self.shadow_phase = ShadowPhase(self.settings, self.database, registry)
        if self.runner.lock.acquire():
            try:
                self.runner.recover()
            finally:
                self.runner.lock.release()
        _active = self
        scheduler = BackgroundScheduler(
            # The persistent store's table is made by the migrations (flywheel.models.schedule), never by a worker.
            jobstores={
                "default": SQLAlchemyJobStore(engine=self.database.engine, tablename=JOBS_TABLE),
                "local": MemoryJobStore(),
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 600},
            timezone=UTC,
        )
        # Paused start opens the persistent job store, so existing schedules are found and kept, not reset.
        scheduler.start(paused=True)
        self._keep_schedule(scheduler, "retrain-check", scheduled_retrain, self.settings.retrain_interval_seconds)
        self._keep_schedule(scheduler, "housekeeping", housekeeping, self.settings.housekeeping_interval_seconds)
        # The drift job publishes its alerts; the listener below turns them into queued retrains.
        self.publisher = EventPublisher(self.settings, name="worker").start()
        add_drift_job(
            scheduler, self.settings, DriftMonitor(self.settings, database=self.database, publisher=self.publisher)
        )
        scheduler.add_job(
            self.poll, IntervalTrigger(seconds=self.settings.retrain_queue_poll_seconds), id="retrain-queue",
            jobstore="local", replace_existing=True,
        )
        scheduler.add_job(
            self.check_challenger, IntervalTrigger(seconds=self.settings.challenger_check_seconds),
            id="challenger-check", jobstore="local", replace_existing=True,
        )
        scheduler.resume()
        self.scheduler = scheduler
        # Each drift alert queues one run; the queue poll starts it, so alerts never run retrains concurrently.
        self._alerts.start()
        if self.webhook is not None:
            self._webhook.start()
            logger.info("alerts are delivered to the webhook at %s", self.webhook.where)
        logger.info("retrain worker started (checks every %ss)", self.settings.retrain_interval_seconds)

    @staticmethod
    def _keep_schedule(scheduler: BackgroundScheduler, job_id: str, func: object, seconds: int) -> None:
        job = scheduler.get_job(job_id)
        trigger = IntervalTrigger(seconds=seconds)
        if job is None:
            # Another worker starting at the same moment may add it between the lookup and here: replacing its job
            # with the same schedule is harmless, refusing to start is not.
            scheduler.add_job(func, trigger, id=job_id, name=job_id, replace_existing=True)
        elif job.trigger.interval.total_seconds() != seconds:
            scheduler.reschedule_job(job_id, trigger=trigger)
        else:
            logger.info("kept schedule of %s: next run at %s", job_id, job.next_run_time)

    def poll(self) -> None:
        """Run a queued (API or drift) request, or retrain when enough new labels have arrived."""
        runner = self._runner()
        if self._shadow_phase().pending():
            logger.debug("a challenger is in its shadow phase; retrains wait until it is decided")
            return
        queued = runner.queued()
        if queued is not None:
            runner.run(RunTrigger(queued.trigger), run_id=queued.run_id)
        elif runner.new_labels() >= self.settings.retrain_min_new_labels:
            runner.run(RunTrigger.NEW_LABELS)

    def scheduled_retrain(self) -> None:
        """The interval trigger: retrain if there is any new accepted feedback at all."""
        runner = self._runner()
        if self._shadow_phase().pending():
            logger.info("scheduled retrain check: a challenger is in its shadow phase; retrains wait for it")
            return
        if runner.new_labels() == 0:
            logger.info("scheduled retrain check: no new accepted feedback")
            return
        runner.run(RunTrigger.SCHEDULE)

    def housekeeping(self) -> None:
        """Reject feedback whose prediction never arrived; delete old rate windows and expired predictions."""
        if self.store is None or self.database is None:
            raise RuntimeError("worker not started")
        self.store.expire_orphans()
        self.store.forget_rate_windows()
        expire_predictions(self.database, self.settings.retention_days)
        DeploymentStore(self.database).expire_shadow_predictions(self.settings.retention_days)

    def check_challenger(self) -> None:
        """Withdraw a canary worse than the champion on feedback; decide a retrain's shadow phase that is due."""
        if self.database is None:
            raise RuntimeError("worker not started")
        DeploymentStore(self.database).review_canary(self.settings)
        self._shadow_phase().settle()

    def _runner(self) -> RetrainRunner:
        if self.runner is None:
            raise RuntimeError("worker not started")
        return self.runner

    def _shadow_phase(self) -> ShadowPhase:
        if self.shadow_phase is None:
            raise RuntimeError("worker not started")
        return self.shadow_phase

    def alerts_health(self) -> Health:
        """Whether the drift-alert listener works, or the fault it is retrying."""
        return self._alerts.health()

    def _consume_alerts(self) -> None:
        """Act on drift alerts until the worker stops; any error closes the consumer, and its supervisor starts a
        fresh one, which is re-delivered the alert whose retrain request was not stored."""
        consumer = kafka_consumer(
            self.settings,
            Topic.ALERTS,
            group_id=ALERTS_GROUP,
            # A first start also acts on alerts sent before it: at most one run is queued at a time.
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=self.settings.ingest_max_poll_interval_ms + 1000,
        )
        try:
            while not self.stopping.is_set():
                for partition, records in consumer.poll(timeout_ms=1000).items():
                    for record in records:
                        self._on_alert(record.value)
                        # Committed only now that the request is stored: a crash before re-delivers the alert.
                        consumer.commit({partition: OffsetAndMetadata(record.offset + 1, "", -1)})
                if _caught_up(consumer):
                    self._alerts.recovered()
        finally:
            consumer.close(autocommit=False)

    def _on_alert(self, payload: bytes) -> None:
        try:
            event = decode(Topic.ALERTS, payload)
        except EventDecodeError as exc:
            logger.warning("ignoring malformed drift alert: %s", exc)
            return
        if isinstance(event, AlertEvent) and event.kind is AlertKind.DRIFT:
            run = self._runner().request(RunTrigger.DRIFT_ALERT, reason=f"drift report {event.report_id}")
            logger.info("drift alert %s queued retrain run %s", event.report_id, run.run_id)

    def webhook_health(self) -> Health:
        """Whether alerts reach the webhook, or the fault it is retrying ("not started" while none is set)."""
        return self._webhook.health()

    def _deliver_alerts(self) -> None:
        """Deliver every alert to the webhook until the worker stops, committing each once the receiver took (or
        refused) it; an alert whose every attempt failed is tried again after a pause, with nothing skipped."""
        webhook = self.webhook
        if webhook is None:
            raise RuntimeError("no alert webhook configured")
        timeout_ms = int(self.settings.alert_webhook_timeout * 1000)
        consumer = kafka_consumer(
            self.settings,
            Topic.ALERTS,
            group_id=WEBHOOK_GROUP,
            # A first start delivers the alerts the topic still holds: a "latest" start would skip any alert sent
            # before the group's first assignment (the topic's first alert among them), and alerts are rare.
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # One attempt blocks polling for up to the webhook timeout: the group must not evict the listener then.
            max_poll_interval_ms=max(self.settings.ingest_max_poll_interval_ms, timeout_ms + 5000),
            session_timeout_ms=max(6000, self.settings.ingest_max_poll_interval_ms + 1000, timeout_ms + 6000),
        )
        failures = 0
        try:
            while not self.stopping.is_set():
                for partition, records in consumer.poll(timeout_ms=1000).items():
                    for record in records:
                        try:
                            self._deliver(webhook, record.value, sleep=_idle(consumer, self.stopping))
                        except WebhookError as exc:
                            self._webhook.fault(describe(exc))
                            pause = min(WEBHOOK_RETRY_MAX_PAUSE_SECONDS, 2.0**failures)
                            failures += 1
                            logger.warning("%s; trying again in %.0f s", exc, pause)
                            # Not committed: the same alert comes back with the next poll.
                            consumer.seek(partition, record.offset)
                            _idle(consumer, self.stopping)(pause)
                            break
                        failures = 0
                        consumer.commit({partition: OffsetAndMetadata(record.offset + 1, "", -1)})
                if _caught_up(consumer):
                    self._webhook.recovered()
        finally:
            consumer.close(autocommit=False)

    def _deliver(self, webhook: AlertWebhook, payload: bytes, sleep: Callable[[float], None]) -> None:
        try:
            event = decode(Topic.ALERTS, payload)
        except EventDecodeError as exc:
            logger.warning("not delivering a malformed alert: %s", exc)
            return
        if isinstance(event, AlertEvent):
            webhook.deliver(event, sleep=sleep)

    def shutdown(self) -> None:
        """Stop taking jobs, interrupt a running fine-tune (its run is marked failed), and wait for jobs to end."""
        global _active
        self.stopping.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        self._alerts.join(timeout=10)
        self._webhook.join(timeout=10)
        if self.webhook is not None:
            self.webhook.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.database is not None:
            self.database.dispose()
        _active = None
        logger.info("retrain worker stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM or SIGINT."""
        done = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s; shutting down", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            done.wait()
        finally:
            self.shutdown()


def _idle(consumer: KafkaConsumer, stop: threading.Event) -> Callable[[float], None]:
    """A wait that keeps ``consumer`` polling its paused partitions, so its group keeps it while it waits to retry."""

    def wait(seconds: float) -> None:
        partitions = consumer.assignment()
        consumer.pause(*partitions)
        deadline = time.monotonic() + seconds
        try:
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                consumer.poll(timeout_ms=int(min(left, 1.0) * 1000) or 1)
        finally:
            consumer.resume(*partitions)

    return wait


def _caught_up(consumer: KafkaConsumer) -> bool:
    """Whether every alert the broker holds was acted on: what a fault of the listener is over with."""
    partitions = consumer.assignment()
    return bool(partitions) and all(
        (end := consumer.highwater(partition)) is not None and consumer.position(partition) >= end
        for partition in partitions
    )
