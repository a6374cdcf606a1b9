"""Tables of drift monitoring: drift reports, the requests drift sent to the review queue, stored embeddings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, LargeBinary, String
from sqlmodel import Field, SQLModel

from flywheel.database.types import UTCDateTime
from flywheel.events import utcnow


class DriftReportBase(SQLModel):
    """What a drift run compared and what it found; the full summary and HTML live in the state directory."""

    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    verdict: str = Field(sa_type=String(24), index=True)
    model_version: str = Field(max_length=64, index=True)
    window_start: datetime | None = Field(default=None, sa_type=UTCDateTime)
    window_end: datetime | None = Field(default=None, sa_type=UTCDateTime)
    window_rule: str = Field(max_length=200)
    current_rows: int
    served_rows: int = 0
    feedback_rows: int = 0
    reference_rows: int = 0
    drift_score: float | None = None
    fired: list[str] = Field(default_factory=list, sa_type=JSON)
    #: Per signal: method, score, threshold, drifted (and why it was skipped, if it was).
    signals: dict[str, dict[str, Any]] = Field(default_factory=dict, sa_type=JSON)
    estimated_accuracy: float | None = None
    realised_accuracy: float | None = None
    targeted: int = 0
    alert_event_id: str | None = Field(default=None, max_length=64)
    duration_seconds: float = 0.0
    message: str = Field(default="", max_length=1000)


class DriftReportCreate(DriftReportBase):
    """A finished drift run, ready to be indexed."""

    report_id: str = Field(max_length=64)


class DriftReport(DriftReportBase, table=True):
    """One row per drift run, insufficient-data runs included."""

    __tablename__ = "drift_report"

    report_id: str = Field(primary_key=True, max_length=64)


class DriftReportPublic(DriftReportBase):
    """A drift report as ``GET /drift/reports`` lists it."""

    report_id: str
    html_url: str = ""


class DriftTargetBase(SQLModel):
    """A logged prediction a drift report found most unlike the reference."""

    prediction_id: str = Field(max_length=64)
    report_id: str = Field(max_length=64, index=True)
    drift_score: float
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)


class DriftTarget(DriftTargetBase, table=True):
    """Review-queue priority: predictions listed here are offered for labeling before the others."""

    __tablename__ = "drift_target"

    prediction_id: str = Field(primary_key=True, max_length=64)


class DriftTargetPublic(DriftTargetBase):
    """A drift target as the API shows it, with the text to label."""

    text: str
    label: str
    confidence: float


class PredictionEmbeddingBase(SQLModel):
    """A logged prediction's text embedded once by the drift encoder, as float16 bytes (``flywheel.encoder``)."""

    #: Deleting the prediction (retention, erasure) deletes its embeddings with it.
    prediction_id: str = Field(
        primary_key=True, max_length=64, foreign_key="prediction.prediction_id", ondelete="CASCADE"
    )
    #: ``DriftEncoder.encoder_id``: reports read only the embeddings of the encoder they compare with.
    encoder: str = Field(primary_key=True, max_length=64)
    dims: int
    vector: bytes = Field(sa_type=LargeBinary)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PredictionEmbedding(PredictionEmbeddingBase, table=True):
    """One row per prediction and drift encoder, written in the background by the ingestion process."""

    __tablename__ = "prediction_embedding"
