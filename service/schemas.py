"""The /predict and /model JSON contract: request parsing with readable 4xx errors, response models."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from flywheel.errors import FlywheelError

EXAMPLE = '{"text": "a wonderful film"} or {"texts": ["a wonderful film", "dull and far too long"]}'


class BadRequestError(FlywheelError):
    """A request the client must fix; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


class ModelInfo(BaseModel):
    """The model this worker serves."""

    version: str
    labels: list[str]
    holdout_metrics: dict[str, Any]
    loaded_at: datetime
    created_at: datetime
    base_model: str
    parent_version: str | None
    max_length: int
    device: str
    dtype: str


class ErrorResponse(BaseModel):
    """Why a request was refused."""

    detail: str


def parse_predict_body(body: bytes, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a /predict body, or BadRequestError saying what is wrong with it."""
    if not body.strip():
        raise BadRequestError(400, f"request body is empty; send JSON like {EXAMPLE}")
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise BadRequestError(400, f"request body is not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    if not isinstance(data, dict):
        raise BadRequestError(422, f"request body must be a JSON object, got {_kind(data)}; send {EXAMPLE}")
    unknown = sorted(set(data) - {"text", "texts"})
    if unknown:
        raise BadRequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; send {EXAMPLE}")
    if ("text" in data) == ("texts" in data):
        which = "both" if "text" in data else "neither"
        raise BadRequestError(422, f"send exactly one of 'text' or 'texts', got {which}; e.g. {EXAMPLE}")
    if "text" in data:
        if not isinstance(data["text"], str):
            raise BadRequestError(422, f"'text' must be a string, got {_kind(data['text'])}")
        texts = [data["text"]]
        names = ["text"]
    else:
        if not isinstance(data["texts"], list):
            raise BadRequestError(422, f"'texts' must be a list of strings, got {_kind(data['texts'])}")
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
            raise BadRequestError(422, f"{name} must be a string, got {_kind(text)}")
        if not text.strip():
            raise BadRequestError(422, f"{name} is empty or only whitespace; there is nothing to classify")
        if len(text) > max_chars:
            raise BadRequestError(
                413, f"{name} has {len(text)} characters, more than the limit of {max_chars}; shorten it"
            )
    return texts


def _kind(value: object) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)
