"""Drift routes mounted on the service: the index page, reports (HTML and JSON), targets, and ``POST /drift/run``."""

# No `from __future__ import annotations`: FastAPI reads route signatures at run time, and their dependencies
# are closures of `create_router`, which string annotations could not name.

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from flywheel.auth import Access
from flywheel.database import BackgroundDatabase, Database, DatabaseError
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.models.access import Role
from flywheel.models.drift import DriftReportPublic, DriftTargetPublic
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelVersion
from flywheel.settings import Settings
from monitoring.dashboard import ShareChart, index_page, share_chart
from monitoring.errors import MonitoringError
from monitoring.label_share import LabelShareCheck, hourly_label_counts
from monitoring.metrics import drift_metrics
from monitoring.reports import DriftSummary, ReportArchive
from monitoring.safe_page import SafePage
from monitoring.store import DriftStore

if TYPE_CHECKING:
    from monitoring.monitor import DriftMonitor

logger = logging.getLogger(__name__)

#: Seconds between refreshes of the drift gauges from the newest indexed report.
GAUGE_REFRESH_SECONDS = 30.0
MAX_LIMIT = 500
#: Longest stretch of hours the index page's label-share chart covers (31 days).
MAX_SHARE_HOURS = 744


class _Gauges:
    """Keeps the drift gauges in step with the newest indexed report (a daemon thread, every 30 s)."""

    def __init__(self, database: BackgroundDatabase) -> None:
        self.database = database
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="drift-gauges", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(GAUGE_REFRESH_SECONDS):
            self.refresh()

    def refresh(self) -> DriftReportPublic | None:
        """Set the gauges from the newest report; returns it (None when there is none or the database is away)."""
        try:
            latest = DriftStore(self.database.get()).latest()
        except (DatabaseError, OperationalError, InterfaceError) as exc:
            logger.warning("cannot read the newest drift report: %s", exc)
            return None
        if latest is not None:
            drift_metrics().observe(latest)
        return latest

    def stop(self) -> None:
        """Stop refreshing."""
        self._stop.set()


class _Runs:
    """At most one in-process drift run at a time, started by ``POST /drift/run``."""

    def __init__(self, settings: Settings, publisher: EventPublisher, database: BackgroundDatabase) -> None:
        self.settings = settings
        self.publisher = publisher
        self.database = database
        self.lock = threading.Lock()
        self.started_at: datetime | None = None
        self.last_error: str | None = None
        self._monitor: DriftMonitor | None = None

    def start(self) -> dict[str, Any]:
        self.database.get()  # DatabaseError (503) before a thread starts, while the database is not open
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
                self._monitor = DriftMonitor(self.settings, database=self.database.get(), publisher=self.publisher)
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
    settings: Settings,
    database: BackgroundDatabase,
    publisher: EventPublisher,
    serving: Callable[[], ModelVersion | None],
    access: Access,
) -> APIRouter:
    """The drift routes for one service worker (see ``service.app`` for the contract)."""
    gauges = _Gauges(database)
    archive = ReportArchive(settings.home)
    runs = _Runs(settings, publisher, database)
    # Drift pages show traffic texts: reviewers (and local readers while no keys exist) only.
    router = APIRouter(tags=["drift"], dependencies=[Depends(access.require(Role.REVIEWER, read_only=True))])

    def drift_store(db: Annotated[Database, Depends(database.get)]) -> DriftStore:
        return DriftStore(db)


    def summary_of(report_id: str) -> DriftSummary:
        try:
            return archive.summary(report_id)
        except MonitoringError as exc:
            raise HTTPException(404, str(exc)) from exc

    def label_shares(db: Database, hours: int, latest: DriftReportPublic | None) -> ShareChart:
        end = utcnow()
        start = end.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
        reference: LabelShareCheck | None = None
        if latest is not None:
            try:
                reference = archive.summary(latest.report_id).label_share
            except (MonitoringError, ValueError) as exc:
                # The chart still shows the hours; only the reference lines are missing.
                logger.warning("cannot read the label shares of drift report %s: %s", latest.report_id, exc)
        return share_chart(hourly_label_counts(db, start, end), end, hours, reference)

    @router.get("/drift", response_class=HTMLResponse)
    async def drift_index(
        db: Annotated[Database, Depends(database.get)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many runs to list and plot.")] = 200,
        hours: Annotated[
            int, Query(ge=1, le=MAX_SHARE_HOURS, description="Hours of predicted label shares to plot.")
        ] = 72,
    ) -> HTMLResponse:
        """Page for people: every run with its verdict, the drift score over time, and label shares by hour."""
        store = DriftStore(db)
        reports = await run_in_threadpool(store.recent, limit)
        total = await run_in_threadpool(store.count)
        shares = await run_in_threadpool(label_shares, db, hours, reports[0] if reports else None)
        page = SafePage(index_page(reports, total, shares))  # no scripts: autoescaped values only, so none may run
        return HTMLResponse(page.html, headers=page.headers)

    @router.get("/drift/reports", response_model=list[DriftReportPublic])
    async def drift_reports(
        store: Annotated[DriftStore, Depends(drift_store)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many reports, newest first.")] = 50,
        offset: Annotated[int, Query(ge=0, description="Reports to skip.")] = 0,
    ) -> list[DriftReportPublic]:
        """Drift runs, newest first: window, row counts, model version, scores, verdict, duration."""
        return await run_in_threadpool(store.recent, limit, offset)

    @router.get("/drift/reports/{report_id}", response_class=HTMLResponse, responses={404: {"description": "None."}})
    async def drift_report_html(report_id: str) -> HTMLResponse:
        """One run's HTML report (Evidently's report with the Flywheel summary on top); only its own scripts run."""
        try:
            page = await run_in_threadpool(archive.page, report_id)
        except MonitoringError as exc:
            raise HTTPException(404, str(exc)) from exc
        return HTMLResponse(page.html, headers=page.headers)

    @router.get("/drift/reports/{report_id}/summary", response_model=DriftSummary)
    async def drift_report_summary(report_id: str) -> DriftSummary:
        """One run's JSON summary: every signal, the verdict, the performance estimate, timings."""
        return summary_of(report_id)

    @router.get("/drift/latest", response_model=DriftSummary, responses={404: {"description": "No report yet."}})
    async def drift_latest(store: Annotated[DriftStore, Depends(drift_store)]) -> DriftSummary:
        """The newest run's JSON summary."""
        latest = await run_in_threadpool(store.latest)
        if latest is None:
            raise HTTPException(404, "no drift report yet: run `flywheel drift run` or POST /drift/run")
        drift_metrics().observe(latest)
        return summary_of(latest.report_id)

    @router.get("/drift/targets", response_model=list[DriftTargetPublic])
    async def drift_targets(
        store: Annotated[DriftStore, Depends(drift_store)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many predictions.")] = 50,
    ) -> list[DriftTargetPublic]:
        """Unlabeled predictions drift found least like the training data: label these first."""
        return await run_in_threadpool(store.targets, limit)

    @router.post(
        "/drift/run",
        status_code=202,
        dependencies=[Depends(access.require(Role.ADMIN))],
        responses={409: {"description": "A run is in progress."}},
    )
    async def drift_run() -> dict[str, Any]:
        """Start a drift report now in this worker; poll ``GET /drift/latest`` for the result."""
        if serving() is None:
            raise HTTPException(503, "no model is loaded yet; retry shortly")
        return runs.start()

    router.on_shutdown.append(gauges.stop)
    return router
