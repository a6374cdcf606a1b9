"""Admin routes of the challenger beside the champion: deploy a shadow or a canary, end it, compare it.

``POST /models/{version}/shadow`` (``{"sample": 0.2}``) and ``POST /models/{version}/canary`` (``{"share": 0.1}``)
deploy a version, ending the challenger deployed before (at most one runs); ``DELETE`` on the same paths stops the
shadow or withdraws the canary; ``GET /models/{version}/comparison`` compares its latest deployment with the served
model, and ``GET /challengers`` lists the deployments. Every replica follows the deployment within
``FLYWHEEL_RELOAD_INTERVAL`` seconds; every change is audited under the caller's name.
"""

# No `from __future__ import annotations`: FastAPI reads route signatures at run time, and their dependencies
# are closures of `create_router`, which string annotations could not name.

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from flywheel.access import Caller
from flywheel.auth import Access
from flywheel.comparison import CanaryComparison, ComparisonError, ShadowComparison, comparison
from flywheel.database import BackgroundDatabase, Database
from flywheel.deployments import DeploymentError, DeploymentStore
from flywheel.errors import RegistryError
from flywheel.models.access import Role
from flywheel.models.deployment import DeploymentCreate, DeploymentMode, DeploymentOutcome, DeploymentPublic
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings


class ShadowRequest(BaseModel):
    """Body of ``POST /models/{version}/shadow``."""

    model_config = ConfigDict(extra="forbid")

    sample: float = Field(0.2, gt=0, le=1, description="Share of live requests the shadow also scores.")


class CanaryRequest(BaseModel):
    """Body of ``POST /models/{version}/canary``."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(gt=0, le=1, description="Share of callers (client ids, else principals) it answers.")


class EndRequest(BaseModel):
    """Optional body of ``DELETE /models/{version}/shadow|canary``."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field("ended by hand", min_length=1, max_length=500)


@contextmanager
def answered() -> Iterator[None]:
    """The store's refusals as HTTP answers: an unknown version or nothing to compare 404, a refused change 409."""
    try:
        yield
    except (RegistryError, ComparisonError) as exc:
        raise HTTPException(404, str(exc)) from exc
    except DeploymentError as exc:
        raise HTTPException(409, str(exc)) from exc


def create_router(
    settings: Settings,
    database: BackgroundDatabase,
    publisher: EventPublisher,
    serving: Callable[[], ModelVersion | None],
    access: Access,
) -> APIRouter:
    """The challenger routes; changes need an admin, reads a reviewer."""
    registry = ModelRegistry(settings)
    router = APIRouter(tags=["challengers"])
    admin = Annotated[Caller, Depends(access.require(Role.ADMIN))]
    reviewer = Depends(access.require(Role.REVIEWER, read_only=True))
    errors: dict[int | str, dict[str, Any]] = {
        404: {"description": "Unknown version, or never deployed"},
        409: {"description": "Refused: see detail"},
    }

    def store(db: Annotated[Database, Depends(database.get)]) -> DeploymentStore:
        return DeploymentStore(db, registry)

    stores = Annotated[DeploymentStore, Depends(store)]

    @router.post("/models/{version}/shadow", status_code=201, responses=errors)
    def start_shadow(version: str, body: ShadowRequest, caller: admin, deployments: stores) -> DeploymentPublic:
        """Deploy ``version`` as a shadow: a sample of live requests is also scored by it and logged, never
        returned."""
        with answered():
            request = DeploymentCreate(version=version, mode=DeploymentMode.SHADOW, share=body.sample)
            return deployments.start(request, caller.name)

    @router.post("/models/{version}/canary", status_code=201, responses=errors)
    def start_canary(version: str, body: CanaryRequest, caller: admin, deployments: stores) -> DeploymentPublic:
        """Deploy ``version`` as a canary: it answers that share of callers, each caller always the same model."""
        with answered():
            request = DeploymentCreate(version=version, mode=DeploymentMode.CANARY, share=body.share)
            return deployments.start(request, caller.name)

    @router.delete("/models/{version}/shadow", responses=errors)
    def stop_shadow(
        version: str, caller: admin, deployments: stores, body: EndRequest | None = None
    ) -> DeploymentPublic:
        """Stop the shadow of ``version``; its figures are kept with the deployment."""
        with answered():
            reason = (body or EndRequest()).reason
            return deployments.end(
                version, DeploymentMode.SHADOW, DeploymentOutcome.STOPPED, actor=caller.name, reason=reason
            )

    @router.delete("/models/{version}/canary", responses=errors)
    def withdraw_canary(
        version: str, caller: admin, deployments: stores, body: EndRequest | None = None
    ) -> DeploymentPublic:
        """Withdraw the canary of ``version``: the champion answers every caller again."""
        with answered():
            reason = (body or EndRequest()).reason
            return deployments.end(
                version, DeploymentMode.CANARY, DeploymentOutcome.WITHDRAWN, actor=caller.name, reason=reason
            )

    @router.get("/models/{version}/comparison", dependencies=[reviewer], responses=errors)
    def compare(version: str, db: Annotated[Database, Depends(database.get)]) -> ShadowComparison | CanaryComparison:
        """The latest deployment of ``version`` against the served model: a shadow's agreement, confidence shift,
        label shares and accuracy on feedback; a canary's accuracy beside the champion's over the same period."""
        with answered():
            return comparison(db, version)

    @router.get("/challengers", dependencies=[reviewer])
    def challengers(deployments: stores, limit: int = Query(50, ge=1, le=500)) -> list[DeploymentPublic]:
        """Shadow and canary deployments, newest first: who started each, how and why it ended."""
        return deployments.history(limit)

    return router
