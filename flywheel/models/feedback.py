"""Tables of the feedback store (predictions, feedback, feedback sources) and their API schemas."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum

from pydantic import ConfigDict, computed_field, field_validator, model_validator
from sqlalchemy import JSON, CheckConstraint, Index, String, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from flywheel.database.types import UTCDateTime
from flywheel.errors import FlywheelError
from flywheel.events import new_id, utcnow

_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/+-]*")


class FeedbackStatus(StrEnum):
    """Where a piece of feedback is in its life."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    USED = "used"


class InvalidSourceError(FlywheelError, ValueError):
    """A feedback source name that cannot be used."""


def check_source(name: str) -> str:
    """``name`` if it is a valid source name (1-64 characters, no spaces), else InvalidSourceError."""
    if not (len(name) <= 64 and _SOURCE.fullmatch(name)):
        raise InvalidSourceError(
            f"invalid source {name[:70]!r}: use 1-64 letters, digits and _ . : @ / + -, starting with a letter or digit"
        )
    return name


def score_margin(scores: dict[str, float]) -> float:
    """Top score minus the runner-up: small margins mark the model's uncertain predictions."""
    top = sorted(scores.values(), reverse=True)
    if not top:
        return 1.0
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


class PredictionBase(SQLModel):
    """A prediction as logged by the service."""

    prediction_id: str = Field(primary_key=True, max_length=64)
    model_version: str = Field(max_length=64, index=True)
    text: str = Field(sa_type=Text)
    label: str = Field(max_length=128)
    confidence: float
    scores: dict[str, float] = Field(sa_type=JSON)
    margin: float = Field(index=True)
    latency_ms: float
    truncated: bool = False
    client_id: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(sa_type=UTCDateTime, index=True)


class Prediction(PredictionBase, table=True):
    """One row per ``prediction_id`` ingested from ``flywheel.predictions``."""

    __tablename__ = "prediction"

    text_key: str = Field(max_length=40, index=True)
    ingested_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PredictionPublic(PredictionBase):
    """A prediction as the API shows it."""


class FeedbackBase(SQLModel):
    """What a person or an annotation import says about a text."""

    label: str = Field(min_length=1, max_length=128)
    source: str = Field(default="api", min_length=1, max_length=64)
    comment: str | None = Field(default=None, sa_type=Text)

    @field_validator("source")
    @classmethod
    def _source_name(cls, value: str) -> str:
        return check_source(value)


class FeedbackCreate(SQLModel):
    """Body of ``POST /feedback``: a correction of a prediction, or a label for a new text."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    label: str = Field(min_length=1, max_length=128)
    #: Free text kept as the label's ``note``; it grants nothing, the label's source is the principal sending it.
    source: str | None = Field(default=None, max_length=64)
    comment: str | None = None
    prediction_id: str | None = Field(default=None, min_length=1, max_length=64)
    text: str | None = Field(default=None, min_length=1)

    @field_validator("source")
    @classmethod
    def _source_name(cls, value: str | None) -> str | None:
        return None if value is None else check_source(value)

    @model_validator(mode="after")
    def _one_target(self) -> FeedbackCreate:
        if (self.prediction_id is None) == (self.text is None):
            raise ValueError("give either prediction_id (to correct a prediction) or text (to label a new text)")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is blank")
        return self


class Feedback(FeedbackBase, table=True):
    """One label, with the evidence it was vetted against and its status."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("prediction_id", "source", name="uq_feedback_prediction_source"),
        # Labels for bare texts are unique per (source, text): re-importing a file updates instead of duplicating.
        Index(
            "uq_feedback_source_text_key",
            "source",
            "text_key",
            unique=True,
            sqlite_where=text("prediction_id IS NULL"),
            postgresql_where=text("prediction_id IS NULL"),
        ),
        Index("ix_feedback_status_created_at", "status", "created_at"),
        CheckConstraint("status IN ('pending', 'accepted', 'rejected', 'used')", name="ck_feedback_status"),
    )

    feedback_id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    #: What the client wrote as `source`: a free-text note that grants nothing (``source`` is the principal).
    note: str | None = Field(default=None, max_length=64)
    #: The reviewer who confirmed this label; confirmed labels count as trusted (the gate may be judged on them).
    confirmed_by: str | None = Field(default=None, max_length=64)
    prediction_id: str | None = Field(default=None, max_length=64)
    #: The prediction's text once joined, or the labeled text itself.
    text: str | None = Field(default=None, sa_type=Text)
    text_key: str | None = Field(default=None, max_length=40, index=True)
    status: str = Field(default=FeedbackStatus.PENDING, sa_type=String(16))
    status_reason: str | None = Field(default=None, max_length=500)
    used_by_version: str | None = Field(default=None, max_length=64, index=True)
    #: Evidence: the probabilities of the model version that judged the text, and what they imply.
    model_version: str | None = Field(default=None, max_length=64)
    # none_as_null: a missing score is SQL NULL (queried with IS NULL), not the JSON value null.
    model_scores: dict[str, float] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    model_label: str | None = Field(default=None, max_length=128)
    model_confidence: float | None = None
    label_quality: float | None = None
    label_issue: bool = False
    conflict: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class FeedbackPublic(FeedbackBase):
    """Feedback as the API and exports show it."""

    feedback_id: str
    note: str | None = None
    confirmed_by: str | None = None
    prediction_id: str | None
    text: str | None
    status: FeedbackStatus
    status_reason: str | None
    used_by_version: str | None
    model_version: str | None
    model_label: str | None
    model_confidence: float | None
    label_quality: float | None
    label_issue: bool
    conflict: bool
    created_at: datetime
    updated_at: datetime


class FeedbackSourceBase(SQLModel):
    """How far the labels of one source can be trusted."""

    source: str = Field(primary_key=True, max_length=64)
    trusted: bool = False
    quarantined: bool = False
    quarantine_reason: str | None = Field(default=None, max_length=500)
    scored: int = 0
    label_issues: int = 0


class FeedbackSource(FeedbackSourceBase, table=True):
    """Counters behind a source's reliability and its trust or quarantine state."""

    __tablename__ = "feedback_source"

    quarantined_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class FeedbackSourcePublic(FeedbackSourceBase):
    """A source with its reliability score."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def reliability(self) -> float:
        """Share of scored labels that were not possible label errors (Laplace-smoothed)."""
        return (self.scored - self.label_issues + 1) / (self.scored + 2)


class RateWindow(SQLModel, table=True):
    """Requests a principal made in one rate-limit window, shared by every service worker and host."""

    __tablename__ = "rate_window"

    principal: str = Field(primary_key=True, max_length=64)
    window_start: datetime = Field(primary_key=True, sa_type=UTCDateTime)
    count: int = 0
