"""The Flywheel BentoML service: ``POST /predict``, ``GET /model``, health, metrics, and other packages' routes.

Run it with ``bentoml serve`` from the repository root (see ``bentofile.yaml``) or ``flywheel serve``.
BentoML answers ``/healthz`` and ``/livez`` (alive), ``/readyz`` (``__is_ready__``: a model is loaded and every event
is either reaching Kafka or being spilled) and ``/metrics`` (its own series plus ours, summed over workers).

Router contract for other packages. A package serving HTTP routes from this service exposes::

    def create_router(
        settings: flywheel.settings.Settings,
        publisher: flywheel.publisher.EventPublisher,
        serving: Callable[[], flywheel.registry.ModelVersion | None],
    ) -> fastapi.APIRouter

``publisher`` is the worker's shared, non-blocking Kafka publisher (``publisher.publish(event)`` for any
``flywheel.events.Event``); ``serving()`` returns the registry entry of the model this worker serves right now
(``version``, ``card.labels``, ``training_data_path``; None before the first model has loaded). It is called once
per worker process at startup and its router is included by one line in ``TextClassifier._include_routers``.
Raise ``fastapi.HTTPException(status, message)`` for refusals: clients get ``{"detail": message}``; invalid
request bodies are answered 422 with a one-line readable ``detail``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import bentoml
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from flywheel.auth import API_KEY_HEADER, verify_api_key
from flywheel.events import PredictionEvent, new_id
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from service.batcher import MicroBatcher, NoModelError
from service.champion import ChampionWatcher, ServedModel
from service.metrics import service_metrics
from service.schemas import (
    BadRequestError,
    ErrorResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    parse_predict_body,
)

logger = logging.getLogger(__name__)

#: Texts per forward pass on CPU unless configured: measured fastest for MiniLM on 2 cores (activations fit in cache).
CPU_FORWARD_BATCH = 16
#: Request header whose value is logged with each prediction as the client id.
CLIENT_ID_HEADER = "x-client-id"
MAX_CLIENT_ID_CHARS = 128

app = FastAPI(
    title="Flywheel",
    description="Text classification with a feedback loop: predictions, model info, feedback and monitoring.",
    version="1",
)


#: Worker process environment (the caller's values win). Spinning OpenMP threads and the tokenizer's own thread
#: pool would take the cores the event loop and the other torch threads need: measured several times slower on
#: 2 shared cores.
WORKER_ENV = [
    {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},
    {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
]


def _service_config() -> dict[str, Any]:
    # The decorator needs these when the module is imported (by `bentoml serve` and each worker), so the
    # environment is read here; nothing is started or created.
    import torch

    settings = Settings()
    config: dict[str, Any] = {
        "workers": settings.serve_workers,
        "traffic": {"timeout": settings.serve_timeout},
        "logging": {"access": {"enabled": settings.serve_access_log}},
        "envs": WORKER_ENV,
    }
    if torch.cuda.is_available():
        config["resources"] = {"gpu": 1}
    return config


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


@app.exception_handler(BadRequestError)
async def _rejected(_: Request, exc: BadRequestError) -> JSONResponse:
    return _error(exc.status, exc.message)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return _error(422, "; ".join(problems))


@app.exception_handler(NoModelError)
async def _no_model(_: Request, exc: NoModelError) -> JSONResponse:
    return _error(503, str(exc))


def _worker_threads(settings: Settings) -> int:
    if settings.torch_threads:
        return settings.torch_threads
    # Workers share the machine's cores instead of each spawning a thread per core.
    return max(1, len(os.sched_getaffinity(0)) // settings.serve_workers)


@bentoml.service(name="flywheel", **_service_config())
@bentoml.asgi_app(app, path="/")
class TextClassifier:
    """Serves the registry's champion with adaptive batching; logs every prediction to Kafka; hot-reloads."""

    def __init__(self) -> None:
        import torch

        self.settings = Settings()
        # BentoML configured logging for this worker with the root at WARNING; let our INFO lines through.
        for package in ("flywheel", "service", "feedback", "monitoring", "retrain"):
            logging.getLogger(package).setLevel(self.settings.log_level.upper())
        # kafka-python logs every failed reconnect as an error; the publisher reports outages once, with the fix.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        torch.set_num_threads(_worker_threads(self.settings))
        self.metrics = service_metrics()
        self.publisher = EventPublisher(self.settings, name="service").start()
        self.watcher = ChampionWatcher(self.settings, ModelRegistry(self.settings), on_swap=self._on_swap)
        self.watcher.check()
        if self.watcher.current is None:
            logger.warning("no champion model yet; /predict answers 503 until one is promoted")
        self.watcher.start()
        self.batcher = MicroBatcher(
            lambda: self.watcher.current,
            max_batch_size=self.settings.batch_max_size,
            max_wait_ms=self.settings.batch_max_wait_ms,
            forward_batch_size=self.settings.inference_batch_size or (
                self.settings.batch_max_size if torch.cuda.is_available() else CPU_FORWARD_BATCH
            ),
            observer=self.metrics.observe_batch,
        ).start()
        self._body_limit = self.settings.predict_max_texts * (self.settings.predict_max_chars * 6 + 8) + 4096
        self._include_routers()

    def _include_routers(self) -> None:
        """Routes of other packages (see the module docstring for the contract)."""
        from feedback.api import create_router as feedback_routes
        from monitoring.api import create_router as drift_routes
        from retrain.api import create_router as retrain_routes

        app.include_router(feedback_routes(self.settings, self.publisher, self.serving))
        app.include_router(retrain_routes(self.settings, self.publisher, self.serving))
        app.include_router(drift_routes(self.settings, self.publisher, self.serving))

    def serving(self) -> ModelVersion | None:
        """Registry entry of the model this worker serves now."""
        current = self.watcher.current
        return current.entry if current is not None else None

    def _on_swap(self, loaded: ServedModel, previous: ServedModel | None) -> None:
        self.metrics.observe_swap(loaded.version, previous.version if previous else None)

    def __is_ready__(self) -> bool:
        return self.watcher.current is not None and self.batcher.alive() and self.publisher.healthy()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        """Stop reloading and batching, then flush (or spill) the queued events."""
        self.watcher.stop()
        self.batcher.stop()
        self.publisher.close()

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={
            400: {"model": ErrorResponse, "description": "Body is not JSON."},
            413: {"model": ErrorResponse, "description": "Too many texts, or a text over the character cap."},
            422: {"model": ErrorResponse, "description": "Body does not follow the schema."},
            503: {"model": ErrorResponse, "description": "No model loaded yet."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(self, request: Request) -> JSONResponse:
        """Classify ``text`` or ``texts``; each prediction gets an id to quote in feedback."""
        started = time.perf_counter()
        verify_api_key(self.settings, request.headers.get(API_KEY_HEADER))
        body = await self._read_body(request)
        texts = parse_predict_body(body, self.settings.predict_max_texts, self.settings.predict_max_chars)
        result = await self.batcher.submit(texts)
        model = result.model
        labels = model.labels
        probs = result.probs
        best = probs.argmax(axis=1)
        confidence = probs[np.arange(len(texts)), best]
        predictions = [
            {
                "prediction_id": new_id(),
                "label": labels[index],
                "confidence": round(score, 6),
                "scores": {label: round(p, 6) for label, p in zip(labels, row, strict=True)},
                "model_version": model.version,
                "truncated": cut,
            }
            for index, score, row, cut in zip(
                best.tolist(), confidence.tolist(), probs.tolist(), result.truncated, strict=True
            )
        ]
        self.metrics.observe_predictions(model.version, labels, best, confidence)
        if self.settings.log_predictions:
            latency_ms = (time.perf_counter() - started) * 1000
            client_id = request.headers.get(CLIENT_ID_HEADER)
            if client_id is not None:
                client_id = client_id[:MAX_CLIENT_ID_CHARS]
            for text, prediction in zip(texts, predictions, strict=True):
                self.publisher.publish(
                    PredictionEvent(text=text, latency_ms=latency_ms, client_id=client_id, **prediction)
                )
        return JSONResponse({"model_version": model.version, "predictions": predictions})

    @app.get("/model", response_model=ModelInfo, responses={503: {"model": ErrorResponse}})
    async def model(self) -> ModelInfo:
        """The model this worker serves: version, labels, holdout metrics, when it was loaded."""
        current = self.watcher.current
        if current is None:
            raise HTTPException(503, "no champion model loaded yet: train and promote one first")
        return current.info()

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._body_limit:
            raise BadRequestError(413, f"request body of {declared} bytes is larger than any valid request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._body_limit:
                raise BadRequestError(413, "request body is larger than any valid request")
            chunks.append(chunk)
        return b"".join(chunks)
