"""The Flywheel BentoML service: one worker's parts, built at start-up and handed to the app factory.

Run it with ``bentoml serve`` from the repository root (see ``bentofile.yaml``) or ``flywheel serve``. BentoML
answers ``/healthz`` and ``/livez`` (alive) and ``/metrics`` (its own series plus ours, summed over workers);
``/readyz`` is answered by :class:`ReadinessMiddleware` with every component's state (see ``service.readiness``).
The routes themselves are built by ``service.app.create_app``.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import bentoml
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from flywheel.access import Principals
from flywheel.database import BackgroundDatabase
from flywheel.logs import configure_worker_logging
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from service.app import create_app
from service.metrics import service_metrics
from service.readiness import DatabaseProbe, Readiness
from service.serving import ModelServer, worker_threads

logger = logging.getLogger(__name__)

#: Connections of the worker's one database pool: the feedback routes' threads plus the other routes' few.
DATABASE_POOL_SIZE = 8
#: Longest a starting worker waits for its first read of the principal table before it takes connections.
KEYS_WAIT_SECONDS = 10.0

#: Worker process environment (the caller's values win). Spinning OpenMP threads and the tokenizer's own thread
#: pool would take the cores the event loop and the other torch threads need: measured several times slower on
#: 2 shared cores.
WORKER_ENV = [
    {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},
    {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
]

#: What BentoML mounts. Its routes are the worker's app, mounted in ``TextClassifier.__init__`` once the parts
#: it needs exist: BentoML takes the ASGI app when the class is decorated, before any worker has started.
shell = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def _service_config() -> dict[str, Any]:
    # The decorator needs these when the module is imported (by `bentoml serve` and each worker), so the
    # environment is read here; nothing is started or created.
    import torch

    settings = Settings()
    config: dict[str, Any] = {
        "workers": settings.serve_workers,
        "traffic": {"timeout": settings.serve_timeout},
        "logging": {"access": {"enabled": settings.serve_access_log}},
        # BentoML records a span for every request (and every body chunk sent and received) whether or not an
        # exporter is configured; a pattern that matches every URL turns its tracing middleware into a pass-through.
        **({} if settings.serve_tracing else {"tracing": {"excluded_urls": [".*"]}}),
        "envs": WORKER_ENV,
    }
    if torch.cuda.is_available():
        config["resources"] = {"gpu": 1}
    return config


class ReadinessMiddleware:
    """Answers ``GET /readyz`` with the worker's component states (BentoML's own handler has no body to show)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/readyz":
            await self.app(scope, receive, send)
            return
        service = bentoml.get_current_service()
        readiness: Readiness | None = getattr(service, "readiness", None)
        status, body = readiness.body() if readiness is not None else (503, b'{"ready": false}')
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": body})


@bentoml.service(name="flywheel", **_service_config())
@bentoml.asgi_app(shell, path="/")
class TextClassifier:
    """Serves the registry's champion with adaptive batching; logs every prediction to Kafka; hot-reloads."""

    def __init__(self) -> None:
        import torch

        self.settings = Settings()
        # BentoML configured logging for this worker; send our loggers' lines through our format and level.
        configure_worker_logging(self.settings.log_level, self.settings.log_json)
        # kafka-python logs every failed reconnect as an error; the publisher reports outages once, with the fix.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        torch.set_num_threads(worker_threads(self.settings))
        self.publisher = EventPublisher(self.settings, name="service").start()
        self.database = BackgroundDatabase(self.settings, pool_size=DATABASE_POOL_SIZE).start()
        self.serving = ModelServer(self.settings, ModelRegistry(self.settings), service_metrics()).start()
        self.principals = Principals(self.settings, self.database).start()
        # A worker takes connections once this returns; with several workers on one socket, /readyz proves only the
        # one that answered it, so each waits (bounded: a database outage at start must not keep /predict down) for
        # its keys rather than answer "retry shortly" to callers another worker would serve.
        if not self.principals.wait_loaded(KEYS_WAIT_SECONDS):
            logger.warning("keys not loaded after %.0f s (database unreachable?); serving, keys load later",
                           KEYS_WAIT_SECONDS)
        self.probe = DatabaseProbe(self.database).start()
        self.readiness = Readiness(
            self.serving, self.publisher, self.probe, self.serving.watcher.alive, self.principals.loaded
        )
        shell.mount("/", create_app(self.settings, self.database, self.publisher, self.serving, self.principals))
        # Start-up left millions of long-lived objects (torch, transformers, the model); a full collection walked
        # them all every few hundred requests, a pause that landed on whichever request allocated. Frozen, they are
        # never walked again.
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
        return self.readiness.evaluate()[0]

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        """Stop reloading and batching, then flush (or spill) the queued events."""
        self.probe.stop()
        self.principals.stop()
        self.serving.stop()
        self.publisher.close()
        self.database.close()


# BentoML's service decorator returns its Service object, which mypy still sees as the class.
TextClassifier.add_asgi_middleware(ReadinessMiddleware)  # type: ignore[attr-defined]
