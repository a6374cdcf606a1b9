"""HTTP routes of the retrain loop: request a retrain (admin) and read the run history."""

# No `from __future__ import annotations`: FastAPI reads route signatures at run time, and their dependencies
# are closures of `create_router`, which string annotations could not name.

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from flywheel.auth import Access
from flywheel.database import BackgroundDatabase, Database
from flywheel.models.access import Role
from flywheel.models.retrain import RetrainRunPublic, RunTrigger
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.runner import RetrainRunner


def create_router(
    settings: Settings,
    database: BackgroundDatabase,
    publisher: EventPublisher,
    serving: Callable[[], ModelVersion | None],
    access: Access,
) -> APIRouter:
    """``POST /retrain`` queues a run for the worker; ``GET /retrain/runs`` lists runs, newest first."""
    registry = ModelRegistry(settings)
    router = APIRouter(tags=["retrain"])

    def runner(db: Annotated[Database, Depends(database.get)]) -> RetrainRunner:
        return RetrainRunner(settings, db, registry)


    @router.post("/retrain", status_code=202, dependencies=[Depends(access.require(Role.ADMIN))])
    def request_retrain(runs: Annotated[RetrainRunner, Depends(runner)]) -> RetrainRunPublic:
        """Queue a retrain; the worker starts it within seconds. An already queued run is returned as is."""
        return runs.request(RunTrigger.API, reason="requested through POST /retrain")

    @router.get("/retrain/runs", dependencies=[Depends(access.require(Role.REVIEWER, read_only=True))])
    def list_runs(
        runs: Annotated[RetrainRunner, Depends(runner)],
        limit: int = Query(50, ge=1, le=500),
    ) -> list[RetrainRunPublic]:
        """Retrain history: trigger, data counts, both models' metrics, decision, duration, versions."""
        return runs.runs(limit)

    return router
