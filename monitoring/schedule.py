"""The scheduled drift job: added to any APScheduler scheduler, or run alone by ``flywheel drift watch``."""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime
from types import FrameType

from apscheduler.job import Job
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from flywheel.errors import FlywheelError
from flywheel.settings import Settings
from monitoring.monitor import DriftMonitor

logger = logging.getLogger(__name__)

JOB_ID = "drift-report"
#: The monitor the scheduled job uses in this process; persistent job stores keep only the job's name.
_monitor: DriftMonitor | None = None


def drift_job() -> None:
    """Job: one drift run with this process's monitor; user-fixable problems are logged on one line."""
    if _monitor is None:
        raise RuntimeError("no drift monitor registered in this process: call add_drift_job first")
    try:
        _monitor.run()
    except FlywheelError as exc:
        logger.warning("scheduled drift report skipped: %s", exc)


def add_drift_job(
    scheduler: BaseScheduler,
    settings: Settings,
    monitor: DriftMonitor,
    jobstore: str = "default",
    run_now: bool = False,
) -> Job:
    """Schedule ``monitor`` every ``drift_interval_seconds``; one run at a time, missed runs coalesced.

    An existing job with the same interval keeps its next run time (persistent job stores survive restarts).
    """
    global _monitor
    _monitor = monitor
    trigger = IntervalTrigger(seconds=settings.drift_interval_seconds)
    existing = scheduler.get_job(JOB_ID, jobstore)
    if existing is not None and not run_now:
        if existing.trigger.interval.total_seconds() != settings.drift_interval_seconds:
            existing = existing.reschedule(trigger)
        return existing
    # APScheduler reads an explicit next_run_time=None as "paused": pass it only to run at once.
    first = {"next_run_time": datetime.now(UTC)} if run_now else {}
    return scheduler.add_job(
        drift_job,
        trigger,
        id=JOB_ID,
        name="drift report",
        jobstore=jobstore,
        replace_existing=True,
        max_instances=1,
        coalesce=True,
        misfire_grace_time=max(60, settings.drift_interval_seconds // 2),
        **first,
    )


def watch(monitor: DriftMonitor, settings: Settings) -> None:
    """Run a report now and then every interval until SIGTERM or SIGINT."""
    scheduler = BlockingScheduler(timezone=UTC)
    add_drift_job(scheduler, settings, monitor, run_now=True)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s; stopping drift reports", signal.Signals(signum).name)
        # wait=False lets the blocking start() return; a report in progress still finishes before exit.
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("drift reports every %ss", settings.drift_interval_seconds)
    scheduler.start()
