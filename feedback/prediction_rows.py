"""The ``prediction`` table row of a logged prediction event, or the ``shadow_prediction`` row of a shadow one,
checked against the table's limits."""

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
#: Column limits of what a shadow event says about the answer it shadows.
_SHADOW_LIMITS = {"deployment_id": 64, "served_version": 64, "served_label": 128}


class InvalidPredictionError(ValueError):
    """A prediction event the store cannot hold (it goes to the dead-letter topic)."""



def prediction_row(event: PredictionEvent, now: datetime) -> dict[str, Any]:
    """The ``prediction`` row of a live event, or InvalidPredictionError saying why it cannot be stored."""
    if event.text is None or event.shadow is not None:
        raise InvalidPredictionError("a shadow prediction belongs in the shadow_prediction table")
    _check(event)
    if "\x00" in event.text:
        raise InvalidPredictionError("text contains a NUL character")
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


def shadow_row(event: PredictionEvent, now: datetime) -> dict[str, Any]:
    """The ``shadow_prediction`` row of a shadow event, or InvalidPredictionError saying why it cannot be stored."""
    shadow = event.shadow
    if shadow is None:
        raise InvalidPredictionError("a live prediction belongs in the prediction table")
    _check(event)
    for field, limit in _SHADOW_LIMITS.items():
        value = getattr(shadow, field)
        if not 0 < len(value) <= limit:
            raise InvalidPredictionError(f"shadow.{field} must be 1-{limit} characters, got {len(value)}")
    if not math.isfinite(shadow.served_confidence):
        raise InvalidPredictionError("shadow.served_confidence must be a finite number")
    return {
        "prediction_id": event.prediction_id,
        "deployment_id": shadow.deployment_id,
        "model_version": event.model_version,
        "label": event.label,
        "confidence": event.confidence,
        "scores": event.scores,
        "truncated": event.truncated,
        "served_version": shadow.served_version,
        "served_label": shadow.served_label,
        "served_confidence": shadow.served_confidence,
        "created_at": event.emitted_at,
        "ingested_at": now,
    }


def _check(event: PredictionEvent) -> None:
    """InvalidPredictionError unless the fields both tables share fit their columns."""
    for field, limit in _LIMITS.items():
        value = getattr(event, field)
        if value is not None and not 0 < len(value) <= limit:
            raise InvalidPredictionError(f"{field} must be 1-{limit} characters, got {len(value)}")
    if not event.scores:
        raise InvalidPredictionError("scores is empty")
    for name, value in event.scores.items():
        if not 0 < len(name) <= _MAX_SCORE_LABEL or not math.isfinite(value):
            raise InvalidPredictionError(f"scores has an invalid entry {name[:40]!r}: {value!r}")
    if not (math.isfinite(event.confidence) and math.isfinite(event.latency_ms)):
        raise InvalidPredictionError("confidence and latency_ms must be finite numbers")
