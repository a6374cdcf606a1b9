"""The ``prediction`` table row of a logged prediction event, checked against the table's limits."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from flywheel.events import PredictionEvent
from flywheel.models.feedback import score_margin
from flywheel.text import text_key

#: Column limits of the prediction table that an event must respect to be stored.
_LIMITS = {"prediction_id": 64, "model_version": 64, "label": 128, "client_id": 128}
_MAX_SCORE_LABEL = 128


class InvalidPredictionError(ValueError):
    """A prediction event the store cannot hold (it goes to the dead-letter topic)."""



def prediction_row(event: PredictionEvent, now: datetime) -> dict[str, Any]:
    """The ``prediction`` row of an event, or InvalidPredictionError saying why it cannot be stored."""
    for field, limit in _LIMITS.items():
        value = getattr(event, field)
        if value is not None and not 0 < len(value) <= limit:
            raise InvalidPredictionError(f"{field} must be 1-{limit} characters, got {len(value)}")
    if "\x00" in event.text:
        raise InvalidPredictionError("text contains a NUL character")
    if not event.scores:
        raise InvalidPredictionError("scores is empty")
    for name, value in event.scores.items():
        if not 0 < len(name) <= _MAX_SCORE_LABEL or not math.isfinite(value):
            raise InvalidPredictionError(f"scores has an invalid entry {name[:40]!r}: {value!r}")
    if not (math.isfinite(event.confidence) and math.isfinite(event.latency_ms)):
        raise InvalidPredictionError("confidence and latency_ms must be finite numbers")
    return {
        "prediction_id": event.prediction_id,
        "model_version": event.model_version,
        "text": event.text,
        "label": event.label,
        "confidence": event.confidence,
        "scores": event.scores,
        "margin": score_margin(event.scores),
        "latency_ms": event.latency_ms,
        "truncated": event.truncated,
        "client_id": event.client_id,
        "created_at": event.emitted_at,
        "text_key": text_key(event.text),
        "ingested_at": now,
    }
