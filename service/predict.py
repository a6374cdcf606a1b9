"""``POST /predict`` and ``GET /model``: classify texts with the served model and log every prediction.

``/predict`` admits its work before doing it (see ``flywheel.admission``): the body's bytes before they are read,
its texts once parsed, each fairly per principal against the worker's bounds; beyond them it answers 503 with
``Retry-After`` at once. An admitted request waits for inference until ``FLYWHEEL_SERVE_TIMEOUT`` at most, and is
dropped before compute when its client disconnects. ``Idempotency-Key`` retries are answered from
``service.idempotency``.

Under a canary, the caller's client id (``X-Client-Id``), else its principal, decides which model answers it, the
same one every time; ``model_version`` says which did. A shadow's predictions are logged as shadow predictions of
the same ``prediction_id`` and never returned.
"""

# No `from __future__ import annotations`: FastAPI reads the route's signature at run time, and its dependency is a
# closure of `create_router`, which a string annotation could not name.

import json
import time
from collections.abc import Awaitable
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from flywheel.access import Caller
from flywheel.admission import Admission, Ticket, sized_limit
from flywheel.auth import Access
from flywheel.events import PredictionEvent, Shadowed, new_id
from flywheel.http import ClientDisconnectedError, read_body, unless_disconnected
from flywheel.metrics import admission_metrics
from flywheel.models.access import Role
from flywheel.publisher import EventPublisher
from flywheel.settings import Settings
from service.batcher import BatchResult, ShadowScores, ShadowSink
from service.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.idempotency import IdempotencyCache
from service.metrics import ServiceMetrics
from service.schemas import (
    PREDICT_ERRORS,
    ErrorResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    parse_predict_body,
)
from service.serving import ModelServer

#: Request header whose value is logged with each prediction as the client id.
CLIENT_ID_HEADER = "x-client-id"
MAX_CLIENT_ID_CHARS = 128


def create_router(
    settings: Settings, publisher: EventPublisher, serving: ModelServer, metrics: ServiceMetrics, access: Access
) -> APIRouter:
    """The prediction routes of one worker; clients (any principal) may call them."""
    client = access.require(Role.CLIENT)
    router = APIRouter(tags=["predictions"], dependencies=[Depends(client)])
    # Every valid body fits in this many bytes (a JSON-escaped character takes at most 6).
    body_limit = settings.predict_max_texts * (settings.predict_max_chars * 6 + 8) + 4096
    admission = Admission(
        "predict",
        "texts",
        sized_limit(
            settings.admission_max_texts,
            serving.throughput,
            min(settings.admission_queue_seconds, settings.serve_timeout),
            settings.admission_min_texts,
            settings.admission_ceiling_texts,
            initial=max(settings.admission_min_texts, settings.batch_max_size),
        ),
        serving.throughput,
        body_limit=settings.admission_max_body_bytes,
    )
    admission.publish()
    dropped = admission_metrics().dropped
    answers = IdempotencyCache(settings.idempotency_ttl_seconds, settings.idempotency_max_bytes)

    @router.post(
        "/predict",
        response_model=PredictResponse,
        responses={status: {"model": ErrorResponse, "description": text} for status, text in PREDICT_ERRORS.items()},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            },
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "A retry with the same key and body gets the same answer (same prediction ids), "
                    "logged once; kept for FLYWHEEL_IDEMPOTENCY_TTL_SECONDS per principal by the worker that "
                    "answered.",
                }
            ],
        },
    )
    async def predict(request: Request, caller: Annotated[Caller, Depends(client)]) -> Response:
        """Classify ``text`` or ``texts``; each prediction gets an id to quote in feedback."""
        started = time.perf_counter()
        deadline = time.monotonic() + settings.serve_timeout
        ticket = admission.ticket()
        try:
            try:
                body = await read_body(
                    request, body_limit, "request", reserve=lambda size: admission.admit_body(ticket, caller.name, size)
                )
            except ClientDisconnectedError:
                # Gone before its job was queued (the batcher counts the ones that leave later).
                dropped.labels(route="predict", reason="cancelled").inc()
                raise
            key = request.headers.get(IDEMPOTENCY_HEADER)

            def work() -> Awaitable[bytes]:
                return classify(request, body, caller, ticket, started=started, deadline=deadline)

            if key is None:
                return _json(await work())
            answer, replayed = await answers.answer(caller.name, key, body, work)
            return _json(answer, {"Idempotent-Replayed": "true"} if replayed else None)
        finally:
            ticket.release()

    async def classify(
        request: Request, body: bytes, caller: Caller, ticket: Ticket, *, started: float, deadline: float
    ) -> bytes:
        texts = parse_predict_body(body, settings.predict_max_texts, settings.predict_max_chars)
        admission.admit_work(ticket, caller.name, len(texts))
        client_id = request.headers.get(CLIENT_ID_HEADER)
        if client_id is not None:
            client_id = client_id[:MAX_CLIENT_ID_CHARS]
        # Made before inference: a shadow's predictions, logged after the answer, quote the same ids.
        ids = [new_id() for _ in texts]
        on_shadow = shadow_logger(ids, started) if settings.log_predictions else None
        result = await unless_disconnected(
            request, serving.predict(texts, deadline, route_key=client_id or caller.name, on_shadow=on_shadow)
        )
        model = result.model
        predictions = [{"prediction_id": pid, **answer} for pid, answer in zip(ids, _answers(result), strict=True)]
        metrics.observe_predictions(model.version, model.labels, *_best(result))
        if settings.log_predictions:
            latency_ms = (time.perf_counter() - started) * 1000
            for text, prediction in zip(texts, predictions, strict=True):
                publisher.publish(PredictionEvent(text=text, latency_ms=latency_ms, client_id=client_id, **prediction))
        return _encode({"model_version": model.version, "predictions": predictions})

    def shadow_logger(ids: list[str], started: float) -> ShadowSink:
        """Logs a shadow's predictions of this request's texts, beside the answers they shadow."""

        def log(scores: ShadowScores) -> None:
            latency_ms = (time.perf_counter() - started) * 1000
            served = _answers(scores.served)
            for prediction_id, answer, theirs in zip(ids, _answers(scores.shadow), served, strict=True):
                shadowed = Shadowed(
                    deployment_id=scores.deployment_id,
                    served_version=scores.served.model.version,
                    served_label=theirs["label"],
                    served_confidence=theirs["confidence"],
                )
                publisher.publish(
                    PredictionEvent(prediction_id=prediction_id, latency_ms=latency_ms, shadow=shadowed, **answer)
                )

        return log

    @router.get("/model", response_model=ModelInfo, responses={503: {"model": ErrorResponse}})
    async def model() -> ModelInfo:
        """The model this worker serves: version, labels, holdout metrics, when it was loaded; and the pointer's
        champion with the reason when this worker refused it (it fails to load)."""
        info = serving.watcher.info()
        if info is None:
            raise HTTPException(503, serving.watcher.unavailable())
        return info

    return router


def _best(result: BatchResult) -> tuple[np.ndarray, np.ndarray]:
    """Index and probability of each text's top label."""
    best = result.probs.argmax(axis=1)
    return best, result.probs[np.arange(len(best)), best]


def _answers(result: BatchResult) -> list[dict[str, Any]]:
    """Each text's prediction but its id, as the response and the events carry it."""
    labels = result.model.labels
    best, confidence = _best(result)
    return [
        {
            "label": labels[index],
            "confidence": round(score, 6),
            "scores": {label: round(p, 6) for label, p in zip(labels, row, strict=True)},
            "model_version": result.model.version,
            "truncated": cut,
        }
        for index, score, row, cut in zip(
            best.tolist(), confidence.tolist(), result.probs.tolist(), result.truncated, strict=True
        )
    ]


def _encode(content: Any) -> bytes:
    # As Starlette's JSONResponse renders, so the bytes can be kept for retries and sent again unchanged.
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _json(body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, media_type="application/json", headers=headers)
