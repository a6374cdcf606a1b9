"""Kafka topics and their event schemas; encoding and decoding live here and nowhere else."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
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


class Shadowed(BaseModel):
    """What a shadow prediction shadows: the deployment, and the served model's answer to the same request."""

    deployment_id: str
    served_version: str
    served_label: str
    served_confidence: float


class PredictionEvent(Event):
    """One text classified by the service; with ``shadow`` set, by a shadow challenger beside the served model.

    Version 2 added ``shadow``. A shadow prediction was never returned to the caller: it carries the id of the live
    prediction it shadows, the challenger's version, label and scores, the served answer, and no text (the live
    prediction has it). A reader from before version 2 refuses one as malformed (its text is null) and dead-letters
    it, so it never stores a shadow prediction as live traffic; a version-1 event reads as a live prediction.
    """

    topic: ClassVar[Topic] = Topic.PREDICTIONS

    schema_version: int = 2
    prediction_id: str
    model_version: str
    #: Every live prediction has its text; a shadow prediction has none.
    text: str | None = None
    label: str
    confidence: float
    scores: dict[str, float]
    latency_ms: float
    truncated: bool = False
    client_id: str | None = None
    shadow: Shadowed | None = None

    @model_validator(mode="after")
    def _text_unless_shadow(self) -> PredictionEvent:
        if self.shadow is None and self.text is None:
            raise ValueError("a live prediction needs its text")
        if self.shadow is not None and self.text is not None:
            raise ValueError("a shadow prediction carries no text: the live prediction it shadows has it")
        return self

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


class AlertKind(StrEnum):
    """What an alert on ``flywheel.alerts`` is about."""

    #: The report's verdict was "drifted": the worker queues a retrain.
    DRIFT = "drift"
    #: A predicted label's share of the window departs from its reference share: for people, no retrain.
    LABEL_SHARE = "label_share"


class AlertEvent(Event):
    """Something a drift report found that people should look at; ``kind`` says what, and which fields it fills.

    Version 2 added ``kind`` and the label-share fields. A version-1 event (no ``kind``: every alert then was a
    drifted verdict) reads as kind ``drift``. A reader from before version 2 still reads a drift alert, and refuses a
    label-share alert as malformed (its ``drift_score`` and ``verdict`` are null), so it never retrains on one.
    """

    topic: ClassVar[Topic] = Topic.ALERTS

    schema_version: int = 2
    kind: AlertKind = AlertKind.DRIFT
    report_id: str
    model_version: str
    current_rows: int
    reference_rows: int
    # Kind drift.
    verdict: Literal["drifted"] | None = None
    drift_score: float | None = None
    signals: dict[str, Any] = Field(default_factory=dict)
    # Kind label_share: the label, its share of the window's predictions (``current_rows`` of them) and of the
    # reference's, how many standard errors apart they are, and a few of the window's texts predicted as it.
    label: str | None = None
    current_share: float | None = None
    reference_share: float | None = None
    z_score: float | None = None
    examples: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> AlertEvent:
        if self.kind is AlertKind.DRIFT:
            if self.drift_score is None:
                raise ValueError("a drift alert needs drift_score")
            self.verdict = "drifted"
        elif self.label is None or self.current_share is None or self.reference_share is None:
            raise ValueError("a label_share alert needs label, current_share and reference_share")
        return self

    def describe(self) -> str:
        """One line for people: what was found, by which report, on which model."""
        if self.kind is AlertKind.DRIFT:
            fired = ", ".join(self.signals) or "no signal named"
            return (
                f"Drift on model {self.model_version}: drift score {self.drift_score:.3f} over {self.current_rows} "
                f"predictions ({fired}); report {self.report_id}"
            )
        z = "" if self.z_score is None else f", {self.z_score:+.1f} standard errors"
        return (
            f"Label share of {self.label!r} on model {self.model_version}: {self.current_share:.3f} of "
            f"{self.current_rows} predictions vs {self.reference_share:.3f} in the reference{z}; "
            f"report {self.report_id}"
        )



class DeadLetterEvent(Event):
    """An event that could not be processed, kept with the error for inspection and replay."""

    topic: ClassVar[Topic] = Topic.DLQ

    source_topic: str
    partition: int
    offset: int
    error: str
    payload: str


EVENT_TYPES: dict[Topic, type[Event]] = {
    cls.topic: cls for cls in (PredictionEvent, FeedbackEvent, AlertEvent, DeadLetterEvent)
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
