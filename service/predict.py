"""``POST /predict`` and ``GET /model``: classify texts with the served model and log every prediction."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from flywheel.auth import Access
from flywheel.events import PredictionEvent, new_id
from flywheel.http import read_body
from flywheel.models.access import Role
from flywheel.publisher import EventPublisher
from flywheel.settings import Settings
from service.metrics import ServiceMetrics
from service.schemas import ErrorResponse, ModelInfo, PredictRequest, PredictResponse, parse_predict_body
from service.serving import ModelServer

#: Request header whose value is logged with each prediction as the client id.
CLIENT_ID_HEADER = "x-client-id"
MAX_CLIENT_ID_CHARS = 128


def create_router(
    settings: Settings, publisher: EventPublisher, serving: ModelServer, metrics: ServiceMetrics, access: Access
) -> APIRouter:
    """The prediction routes of one worker; clients (any principal) may call them."""
    router = APIRouter(tags=["predictions"], dependencies=[Depends(access.require(Role.CLIENT))])
    # Every valid body fits in this many bytes (a JSON-escaped character takes at most 6).
    body_limit = settings.predict_max_texts * (settings.predict_max_chars * 6 + 8) + 4096

    @router.post(
        "/predict",
        response_model=PredictResponse,
        responses={
            400: {"model": ErrorResponse, "description": "Body is not UTF-8 JSON, or nests more than 16 levels deep."},
            401: {"model": ErrorResponse, "description": "API key missing or wrong."},
            413: {"model": ErrorResponse, "description": "Too many texts, or a text over the character cap."},
            422: {
                "model": ErrorResponse,
                "description": "Body does not follow the schema (duplicate keys, NaN, NUL characters and lone "
                "surrogates included), or the model cannot classify one of its texts.",
            },
            500: {"model": ErrorResponse, "description": "The model fails on every text (logged)."},
            503: {"model": ErrorResponse, "description": "No model loaded yet."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(request: Request) -> JSONResponse:
        """Classify ``text`` or ``texts``; each prediction gets an id to quote in feedback."""
        started = time.perf_counter()
        body = await read_body(request, body_limit, "request")
        texts = parse_predict_body(body, settings.predict_max_texts, settings.predict_max_chars)
        result = await serving.predict(texts)
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
        metrics.observe_predictions(model.version, labels, best, confidence)
        if settings.log_predictions:
            latency_ms = (time.perf_counter() - started) * 1000
            client_id = request.headers.get(CLIENT_ID_HEADER)
            if client_id is not None:
                client_id = client_id[:MAX_CLIENT_ID_CHARS]
            for text, prediction in zip(texts, predictions, strict=True):
                publisher.publish(PredictionEvent(text=text, latency_ms=latency_ms, client_id=client_id, **prediction))
        return JSONResponse({"model_version": model.version, "predictions": predictions})

    @router.get("/model", response_model=ModelInfo, responses={503: {"model": ErrorResponse}})
    async def model() -> ModelInfo:
        """The model this worker serves: version, labels, holdout metrics, when it was loaded."""
        current = serving.current
        if current is None:
            raise HTTPException(503, "no champion model loaded yet: train and promote one first")
        return current.info()

    return router
