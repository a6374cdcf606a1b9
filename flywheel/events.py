"""Kafka topics and their event schemas; encoding and decoding live here and nowhere else."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from uuid6 import uuid7

from flywheel.errors import FlywheelError, describe_validation_errors


class Topic(StrEnum):
    """Every topic Flywheel reads or writes."""

    PREDICTIONS = "flywheel.predictions"
    FEEDBACK = "flywheel.feedback"
    ALERTS = "flywheel.alerts"
    DLQ = "flywheel.dlq"


def new_id() -> str:
    """A time-ordered unique id (UUIDv7) as a string."""
    return str(uuid7())


def utcnow() -> datetime:
    """Timezone-aware now, in UTC."""
    return datetime.now(UTC)


class Event(BaseModel):
    """Fields every event carries; subclasses bind themselves to one topic."""

    model_config = ConfigDict(extra="ignore")
    topic: ClassVar[Topic]

    schema_version: int = 1
    event_id: str = Field(default_factory=new_id)
    emitted_at: datetime = Field(default_factory=utcnow)

    def key(self) -> bytes | None:
        """Partition key; events with the same key keep their order."""
        return None


class PredictionEvent(Event):
    """One text classified by the service."""

    topic: ClassVar[Topic] = Topic.PREDICTIONS

    prediction_id: str
    model_version: str
    text: str
    label: str
    confidence: float
    scores: dict[str, float]
    latency_ms: float
    truncated: bool = False
    client_id: str | None = None

    def key(self) -> bytes:
        return self.prediction_id.encode()


class FeedbackEvent(Event):
    """A correction or a new label submitted by a person or an annotation import."""

    topic: ClassVar[Topic] = Topic.FEEDBACK

    feedback_id: str
    prediction_id: str | None = None
    text: str | None = None
    label: str
    #: The principal that sent the label.
    source: str
    comment: str | None = None
    status: str
    #: What the client wrote as its source (free text). Optional, so events from before it existed still decode.
    note: str | None = None

    def key(self) -> bytes:
        return self.feedback_id.encode()


class DriftAlertEvent(Event):
    """A drift report whose verdict was "drifted"."""

    topic: ClassVar[Topic] = Topic.ALERTS

    report_id: str
    model_version: str
    verdict: Literal["drifted"] = "drifted"
    drift_score: float
    signals: dict[str, Any] = Field(default_factory=dict)
    current_rows: int
    reference_rows: int


class DeadLetterEvent(Event):
    """An event that could not be processed, kept with the error for inspection and replay."""

    topic: ClassVar[Topic] = Topic.DLQ

    source_topic: str
    partition: int
    offset: int
    error: str
    payload: str


EVENT_TYPES: dict[Topic, type[Event]] = {
    cls.topic: cls for cls in (PredictionEvent, FeedbackEvent, DriftAlertEvent, DeadLetterEvent)
}


class EventDecodeError(FlywheelError):
    """A message on a topic is not a valid event of that topic's schema."""


def encode(event: Event) -> bytes:
    """Serialise an event as UTF-8 JSON."""
    return event.model_dump_json().encode()


def decode(topic: str | Topic, payload: bytes) -> Event:
    """Parse a message of ``topic`` into its event model."""
    try:
        cls = EVENT_TYPES[Topic(topic)]
    except ValueError as exc:
        raise EventDecodeError(f"unknown topic {topic!r}") from exc
    try:
        return cls.model_validate_json(payload)
    except ValidationError as exc:
        raise EventDecodeError(
            f"invalid {cls.__name__} ({exc.error_count()} errors): {describe_validation_errors(exc.errors(), limit=1)}"
        ) from exc
