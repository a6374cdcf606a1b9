"""HTTP routes of the retrain loop: request a retrain (admin) and read the run history."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, HTTPException, Query

from flywheel.auth import admin_guard
from flywheel.database import BackgroundDatabase, DatabaseError
from flywheel.models.retrain import RetrainRunPublic, RunTrigger
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.runner import RetrainRunner


def create_router(
    settings: Settings, publisher: EventPublisher, serving: Callable[[], ModelVersion | None]
) -> APIRouter:
    """``POST /retrain`` queues a run for the worker; ``GET /retrain/runs`` lists runs, newest first."""
    # Opened in the background: the service starts (and predicts) while the database is still down.
    background = BackgroundDatabase(settings, pool_size=2).start()
    registry = ModelRegistry(settings)
    router = APIRouter(tags=["retrain"])

    def runner() -> RetrainRunner:
        try:
            database = background.get()
        except DatabaseError as exc:
            raise HTTPException(503, str(exc)) from exc
        return RetrainRunner(settings, database, registry)

    @router.post("/retrain", status_code=202, dependencies=[Depends(admin_guard(settings))])
    def request_retrain() -> RetrainRunPublic:
        """Queue a retrain; the worker starts it within seconds. An already queued run is returned as is."""
        return runner().request(RunTrigger.API, reason="requested through POST /retrain")

    @router.get("/retrain/runs")
    def list_runs(limit: int = Query(50, ge=1, le=500)) -> list[RetrainRunPublic]:
        """Retrain history: trigger, data counts, both models' metrics, decision, duration, versions."""
        return runner().runs(limit)

    return router
