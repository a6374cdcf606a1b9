"""Drift routes mounted on the service: the index page, reports (HTML and JSON), targets, and ``POST /drift/run``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from flywheel.auth import admin_guard
from flywheel.database import Database, DatabaseError
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.models.drift import DriftReportPublic, DriftTargetPublic
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelVersion
from flywheel.settings import Settings
from monitoring.dashboard import index_page
from monitoring.errors import MonitoringError
from monitoring.metrics import drift_metrics
from monitoring.reports import DriftSummary, ReportArchive
from monitoring.store import DriftStore

if TYPE_CHECKING:
    from monitoring.monitor import DriftMonitor

logger = logging.getLogger(__name__)

#: Seconds between refreshes of the drift gauges from the newest indexed report.
GAUGE_REFRESH_SECONDS = 30.0
MAX_LIMIT = 500


class _Backend:
    """Opens the database in the background, then keeps the drift gauges in step with the newest report."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database: Database | None = None
        self.store: DriftStore | None = None
        self.error = "starting"
        threading.Thread(target=self._open, name="drift-db", daemon=True).start()

    def _open(self) -> None:
        delay = 1.0
        while self.store is None:
            database = Database.from_settings(self.settings, pool_size=4)
            try:
                database.start()
            except DatabaseError as exc:
                self.error = str(exc)
                logger.warning("drift index unavailable, retrying in %.0fs: %s", delay, exc)
                database.dispose()
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.database = database
            self.store = DriftStore(database)
        while True:
            self.refresh_gauges()
            time.sleep(GAUGE_REFRESH_SECONDS)

    def refresh_gauges(self) -> DriftReportPublic | None:
        """Set the gauges from the newest report; returns it."""
        if self.store is None:
            return None
        try:
            latest = self.store.latest()
        except (OperationalError, InterfaceError) as exc:
            logger.warning("cannot read the newest drift report: %s", exc)
            return None
        if latest is not None:
            drift_metrics().observe(latest)
        return latest

    def ready(self) -> DriftStore:
        if self.store is None:
            raise HTTPException(503, f"drift index is not available yet ({self.error}); retry shortly")
        return self.store


class _Runs:
    """At most one in-process drift run at a time, started by ``POST /drift/run``."""

    def __init__(self, settings: Settings, publisher: EventPublisher, backend: _Backend) -> None:
        self.settings = settings
        self.publisher = publisher
        self.backend = backend
        self.lock = threading.Lock()
        self.started_at: datetime | None = None
        self.last_error: str | None = None
        self._monitor: DriftMonitor | None = None

    def start(self) -> dict[str, Any]:
        if self.backend.database is None:
            raise HTTPException(503, f"drift index is not available yet ({self.backend.error}); retry shortly")
        if not self.lock.acquire(blocking=False):
            raise HTTPException(
                409, f"a drift report is already running (started {self.started_at:%H:%M:%S} UTC); poll /drift/latest"
            )
        self.started_at = utcnow()
        threading.Thread(target=self._run, name="drift-run", daemon=True).start()
        return {"status": "started", "started_at": self.started_at.isoformat(), "poll": "/drift/latest"}

    def _run(self) -> None:
        try:
            # Imported on first use: Evidently and the analysis stack stay out of worker start-up.
            from monitoring.monitor import DriftMonitor

            if self._monitor is None:
                self._monitor = DriftMonitor(self.settings, database=self.backend.database, publisher=self.publisher)
            self._monitor.run()
            self.last_error = None
        except FlywheelError as exc:
            self.last_error = str(exc)
            logger.warning("drift run failed: %s", exc)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.exception("drift run crashed")
        finally:
            self.lock.release()


def create_router(
    settings: Settings, publisher: EventPublisher, serving: Callable[[], ModelVersion | None]
) -> APIRouter:
    """The drift routes for one service worker (see ``service.service`` for the contract)."""
    backend = _Backend(settings)
    archive = ReportArchive(settings.home)
    runs = _Runs(settings, publisher, backend)
    router = APIRouter(tags=["drift"])
    unreachable = "drift index is unreachable right now; retry shortly"

    def summary_of(report_id: str) -> DriftSummary:
        try:
            return archive.summary(report_id)
        except MonitoringError as exc:
            raise HTTPException(404, str(exc)) from exc

    @router.get("/drift", response_class=HTMLResponse)
    async def drift_index(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many runs to list and plot.")] = 200,
    ) -> HTMLResponse:
        """Page for people: every run with its verdict, and the drift score over time."""
        store = backend.ready()
        try:
            reports = await run_in_threadpool(store.recent, limit)
            total = await run_in_threadpool(store.count)
        except (OperationalError, InterfaceError) as exc:
            raise HTTPException(503, unreachable) from exc
        return HTMLResponse(index_page(reports, total))

    @router.get("/drift/reports", response_model=list[DriftReportPublic])
    async def drift_reports(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many reports, newest first.")] = 50,
        offset: Annotated[int, Query(ge=0, description="Reports to skip.")] = 0,
    ) -> list[DriftReportPublic]:
        """Drift runs, newest first: window, row counts, model version, scores, verdict, duration."""
        store = backend.ready()
        try:
            return await run_in_threadpool(store.recent, limit, offset)
        except (OperationalError, InterfaceError) as exc:
            raise HTTPException(503, unreachable) from exc

    @router.get("/drift/reports/{report_id}", response_class=FileResponse, responses={404: {"description": "None."}})
    async def drift_report_html(report_id: str) -> FileResponse:
        """One run's HTML report (Evidently's report with the Flywheel summary on top)."""
        try:
            path = archive.html_path(report_id)
        except MonitoringError as exc:
            raise HTTPException(404, str(exc)) from exc
        return FileResponse(path, media_type="text/html; charset=utf-8")

    @router.get("/drift/reports/{report_id}/summary", response_model=DriftSummary)
    async def drift_report_summary(report_id: str) -> DriftSummary:
        """One run's JSON summary: every signal, the verdict, the performance estimate, timings."""
        return summary_of(report_id)

    @router.get("/drift/latest", response_model=DriftSummary, responses={404: {"description": "No report yet."}})
    async def drift_latest() -> DriftSummary:
        """The newest run's JSON summary."""
        backend.ready()
        latest = await run_in_threadpool(backend.refresh_gauges)
        if latest is None:
            raise HTTPException(404, "no drift report yet: run `flywheel drift run` or POST /drift/run")
        return summary_of(latest.report_id)

    @router.get("/drift/targets", response_model=list[DriftTargetPublic])
    async def drift_targets(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many predictions.")] = 50,
    ) -> list[DriftTargetPublic]:
        """Unlabeled predictions drift found least like the training data: label these first."""
        store = backend.ready()
        try:
            return await run_in_threadpool(store.targets, limit)
        except (OperationalError, InterfaceError) as exc:
            raise HTTPException(503, unreachable) from exc

    @router.post(
        "/drift/run",
        status_code=202,
        dependencies=[Depends(admin_guard(settings))],
        responses={409: {"description": "A run is in progress."}},
    )
    async def drift_run() -> dict[str, Any]:
        """Start a drift report now in this worker; poll ``GET /drift/latest`` for the result."""
        if serving() is None:
            raise HTTPException(503, "no model is loaded yet; retry shortly")
        return runs.start()

    return router
