"""The drift job on an APScheduler scheduler: interval from settings, one run at a time, schedule kept."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from flywheel.settings import Settings
from monitoring.monitor import DriftMonitor
from monitoring.schedule import JOB_ID, add_drift_job, drift_job


@pytest.fixture()
def scheduler() -> Iterator[BackgroundScheduler]:
    paused = BackgroundScheduler()
    paused.start(paused=True)
    yield paused
    paused.shutdown(wait=False)


def test_job_runs_hourly_alone_and_keeps_its_schedule(scheduler: BackgroundScheduler, settings: Settings) -> None:
    monitor = DriftMonitor(settings)
    job = add_drift_job(scheduler, settings, monitor)

    assert job.id == JOB_ID
    assert job.func is drift_job
    assert job.trigger.interval.total_seconds() == 3600
    assert job.max_instances == 1
    assert job.coalesce is True
    first_run = job.next_run_time

    again = add_drift_job(scheduler, settings, monitor)
    assert again.next_run_time == first_run
    assert len(scheduler.get_jobs()) == 1

    faster = settings.model_copy(update={"drift_interval_seconds": 600})
    moved = add_drift_job(scheduler, faster, monitor)
    assert moved.trigger.interval.total_seconds() == 600
    assert len(scheduler.get_jobs()) == 1


def test_job_failure_is_logged_on_one_line(
    scheduler: BackgroundScheduler, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    add_drift_job(scheduler, settings, DriftMonitor(settings))

    drift_job()

    assert "scheduled drift report skipped: no database to read the current window from" in caplog.text
