"""The /predict and /model JSON contract: request parsing with readable 4xx errors, response models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from flywheel.errors import BadRequestError
from flywheel.http import json_kind, parse_json_object

EXAMPLE = '{"text": "a wonderful film"} or {"texts": ["a wonderful film", "dull and far too long"]}'

#: Every error status ``POST /predict`` answers, as its OpenAPI responses and the README's catalogue list them.
PREDICT_ERRORS: dict[int | str, str] = {
    400: "Body is not UTF-8 JSON, or nests more than 16 levels deep; or a malformed Idempotency-Key.",
    401: "API key missing, wrong or revoked.",
    403: "A browser session without its CSRF token.",
    409: "A request with the same Idempotency-Key is still being answered; retry shortly.",
    413: "Body too large, too many texts, or a text over the character cap.",
    422: "Body does not follow the schema (duplicate keys, NaN, NUL characters and lone surrogates included), the "
    "model cannot classify one of its texts, or an Idempotency-Key reused with a different body.",
    500: "The model fails on every text (logged).",
    503: "No model loaded yet, or the worker is at capacity (admission control): retry after Retry-After seconds.",
    504: "The request waited for inference past FLYWHEEL_SERVE_TIMEOUT and was not computed.",
}


class PredictRequest(BaseModel):
    """Send exactly one of ``text`` or ``texts``."""

    text: str | None = Field(None, description="One text to classify.", examples=["a wonderful film"])
    texts: list[str] | None = Field(None, description="Several texts, classified in one call.")


class Prediction(BaseModel):
    """The classification of one text."""

    prediction_id: str = Field(description="Unique, time-ordered id (UUIDv7); quote it when sending feedback.")
    label: str
    confidence: float = Field(description="Probability of the predicted label.")
    scores: dict[str, float] = Field(description="Probability of every label.")
    model_version: str
    truncated: bool = Field(description="True when the text was longer than the model reads and was cut.")


class PredictResponse(BaseModel):
    """Predictions in the order of the request's texts, all made by one model version."""

    model_version: str
    predictions: list[Prediction]


class RefusedModel(BaseModel):
    """A champion this worker does not serve because it fails to load."""

    version: str
    reason: str = Field(description="The load error, e.g. a truncated model.safetensors.")
    refused_at: datetime = Field(description="When the last attempt to load it failed.")
    attempts: int = Field(description="Failed loads so far; it is tried again with backoff and whenever the pointer "
                          "changes.")


class ModelInfo(BaseModel):
    """The model this worker serves."""

    version: str = Field(description="The version this worker serves.")
    champion: str = Field(description="The version the champion pointer names; differs from version while this "
                          "worker cannot load it.")
    fallback: bool = Field(description="True while this worker serves an earlier champion because the pointer's "
                           "champion fails to load.")
    refused: RefusedModel | None = Field(None, description="The champion this worker refused, and why.")
    labels: list[str]
    holdout_metrics: dict[str, Any]
    loaded_at: datetime
    created_at: datetime
    base_model: str
    parent_version: str | None
    max_length: int
    device: str
    dtype: str
    #: Runtime of the forward passes: torch, onnx or onnx-int8 (see FLYWHEEL_RUNTIME).
    runtime: str = "torch"


class ErrorResponse(BaseModel):
    """Why a request was refused."""

    detail: str


def parse_predict_body(body: bytes, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a /predict body, or BadRequestError saying what is wrong with it (see ``parse_json_object``)."""
    data = parse_json_object(body, EXAMPLE)
    unknown = sorted(set(data) - {"text", "texts"})
    if unknown:
        raise BadRequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; send {EXAMPLE}")
    if ("text" in data) == ("texts" in data):
        which = "both" if "text" in data else "neither"
        raise BadRequestError(422, f"send exactly one of 'text' or 'texts', got {which}; e.g. {EXAMPLE}")
    if "text" in data:
        if not isinstance(data["text"], str):
            raise BadRequestError(422, f"'text' must be a string, got {json_kind(data['text'])}")
        texts = [data["text"]]
        names = ["text"]
    else:
        if not isinstance(data["texts"], list):
            raise BadRequestError(422, f"'texts' must be a list of strings, got {json_kind(data['texts'])}")
        texts = data["texts"]
        if not texts:
            raise BadRequestError(422, "'texts' is empty; send at least one text")
        if len(texts) > max_texts:
            raise BadRequestError(
                413, f"too many texts: {len(texts)} in one request, at most {max_texts}; split it into several"
            )
        names = [f"texts[{i}]" for i in range(len(texts))]
    for name, text in zip(names, texts, strict=True):
        if not isinstance(text, str):
            raise BadRequestError(422, f"{name} must be a string, got {json_kind(text)}")
        if not text.strip():
            raise BadRequestError(422, f"{name} is empty or only whitespace; there is nothing to classify")
        if len(text) > max_chars:
            raise BadRequestError(
                413, f"{name} has {len(text)} characters, more than the limit of {max_chars}; shorten it"
            )
    return texts
