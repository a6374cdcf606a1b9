"""The app factory: the whole HTTP API of one worker, built from the parts it is given.

``create_app(settings, database, publisher, serving, principals)`` is what the BentoML service mounts, and what tests
build in-process with a real database, a real broker and a tiny real model. Router contract for other packages: a
package serving HTTP routes exposes::

    def create_router(
        settings: flywheel.settings.Settings,
        database: flywheel.database.BackgroundDatabase,
        publisher: flywheel.publisher.EventPublisher,
        serving: Callable[[], flywheel.registry.ModelVersion | None],
        access: flywheel.auth.Access,
    ) -> fastapi.APIRouter

``database`` is the worker's one database, opened in the background: routes take it as a FastAPI dependency
(``Depends(database.get)``), and while it is not open or not reachable the app answers 503 (one handler below, for
``DatabaseError`` and SQLAlchemy's connection errors) while ``/predict`` keeps working. ``publisher`` is the
worker's non-blocking Kafka publisher (``publisher.publish(event)``); ``serving()`` returns the registry entry of
the model served right now (None before the first one has loaded). Every route declares the role it needs with
``Depends(access.require(Role.X))``, which also hands it the ``Caller`` (see ``flywheel.auth``). Raise
``fastapi.HTTPException(status, message)`` or ``flywheel.errors.BadRequestError(status, message)`` for refusals:
clients get ``{"detail": message}``; read JSON bodies with ``flywheel.http.parse_json_object`` (strict, answered
4xx whatever the bytes); invalid bodies are answered 422 with a one-line ``detail`` written by
``flywheel.errors.describe_validation_errors``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import InterfaceError, OperationalError

from feedback.api import create_router as feedback_routes
from feedback.desk import create_router as desk_routes
from flywheel.access import Principals
from flywheel.admission import DeadlineExceededError, OverloadedError
from flywheel.auth import Access
from flywheel.database import BackgroundDatabase, DatabaseError
from flywheel.errors import BadRequestError, describe_validation_errors
from flywheel.http import ClientDisconnectedError
from flywheel.publisher import EventPublisher
from flywheel.sessions import SessionSigner, load_secret
from flywheel.settings import Settings
from monitoring.api import create_router as drift_routes
from retrain.api import create_router as retrain_routes
from retrain.models_page import create_router as models_page_routes
from service.batcher import InferenceError, NoModelError
from service.deployments import create_router as challenger_routes
from service.login import create_router as login_routes
from service.metrics import service_metrics
from service.predict import create_router as prediction_routes
from service.readiness import Readiness
from service.serving import ModelServer

logger = logging.getLogger(__name__)

#: Status logged for a request whose client disconnected first (nginx's "client closed request"); nobody reads it.
CLIENT_CLOSED = 499


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def create_app(
    settings: Settings,
    database: BackgroundDatabase,
    publisher: EventPublisher,
    serving: ModelServer,
    principals: Principals,
    *,
    readiness: Readiness | None = None,
) -> FastAPI:
    """Every route of the service; ``readiness``, when given, also answers ``GET /readyz`` (in-process use)."""
    secret = settings.session_secret.get_secret_value() if settings.session_secret else None
    access = Access(principals, SessionSigner(load_secret(settings.home, secret)))
    app = FastAPI(
        title="Flywheel",
        description="Text classification with a feedback loop: predictions, model info, feedback and monitoring.",
        version="1",
    )
    app.include_router(prediction_routes(settings, publisher, serving, service_metrics(), access))
    app.include_router(login_routes(access))
    for routes in (feedback_routes, desk_routes, retrain_routes, models_page_routes, drift_routes, challenger_routes):
        app.include_router(routes(settings, database, publisher, serving.entry, access))
    # The challenger deployed beside the champion is read from this worker's database.
    serving.follow_challengers(database)

    @app.exception_handler(BadRequestError)
    async def _rejected(_: Request, exc: BadRequestError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, describe_validation_errors(exc.errors()))

    @app.exception_handler(NoModelError)
    async def _no_model(_: Request, exc: NoModelError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(OverloadedError)
    async def _overloaded(_: Request, exc: OverloadedError) -> JSONResponse:
        response = _error(503, exc.message)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(DeadlineExceededError)
    async def _expired(_: Request, exc: DeadlineExceededError) -> JSONResponse:
        return _error(504, str(exc))

    @app.exception_handler(ClientDisconnectedError)
    async def _gone(_: Request, exc: ClientDisconnectedError) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(InferenceError)
    async def _inference_failed(_: Request, exc: InferenceError) -> JSONResponse:
        return _error(500, str(exc))

    @app.exception_handler(DatabaseError)
    async def _database_not_open(_: Request, exc: DatabaseError) -> JSONResponse:
        return _error(503, f"the database is not available yet: {exc}")

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unreachable(_: Request, exc: Exception) -> JSONResponse:
        logger.warning("database unreachable during a request: %s", str(exc).splitlines()[0])
        return _error(503, "the database is unreachable right now; predictions still work, retry this shortly")

    if readiness is not None:

        @app.get("/readyz", include_in_schema=False)
        async def _ready() -> Response:
            status, body = readiness.body()
            return Response(body, status_code=status, media_type="application/json")

    return app
