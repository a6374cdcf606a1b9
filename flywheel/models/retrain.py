"""Tables of the retrain loop: one row per retrain run, and the lease that lets one worker retrain at a time."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, String
from sqlmodel import Field, SQLModel

from flywheel.database.types import UTCDateTime
from flywheel.events import new_id, utcnow


class RunStatus(StrEnum):
    """Where a retrain run is; the last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    PROMOTING = "promoting"
    #: Passed the gate; its challenger is in its shadow phase (FLYWHEEL_RETRAIN_SHADOW_MINUTES) until decided.
    SHADOW = "shadow"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    FAILED = "failed"


class RunTrigger(StrEnum):
    """Why a retrain run started."""

    SCHEDULE = "schedule"
    NEW_LABELS = "new_labels"
    DRIFT_ALERT = "drift_alert"
    MANUAL = "manual"
    API = "api"


class RetrainRunBase(SQLModel):
    """What a retrain run was asked to do and what it decided."""

    trigger: str = Field(sa_type=String(16))
    status: str = Field(default=RunStatus.QUEUED, sa_type=String(16), index=True)
    reason: str | None = Field(default=None, max_length=1000)
    champion_version: str | None = Field(default=None, max_length=64)
    challenger_version: str | None = Field(default=None, max_length=64)
    original_rows: int = 0
    feedback_rows: int = 0
    feedback_train_rows: int = 0
    feedback_eval_rows: int = 0
    #: Macro-F1 and friends of each model on the golden holdout and on the held-out feedback slice.
    champion_metrics: dict[str, Any] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    challenger_metrics: dict[str, Any] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    #: Every challenger the run trained: its settings, scores on both sets, and whether the gate allowed it.
    candidates: list[dict[str, Any]] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    #: What the gate decided on: the held-out slice's size, the chosen gain and its paired-bootstrap interval.
    gate_evidence: dict[str, Any] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_seconds: float | None = None


class RetrainRun(RetrainRunBase, table=True):
    """One retrain run, written before any work starts so that a crash leaves a trace."""

    __tablename__ = "retrain_run"

    run_id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    worker: str | None = Field(default=None, max_length=200)
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RetrainRunPublic(RetrainRunBase):
    """A retrain run as the API and CLI show it."""

    run_id: str


class RetrainLease(SQLModel, table=True):
    """A named lock row: whoever holds an unexpired lease may retrain."""

    __tablename__ = "retrain_lease"

    name: str = Field(primary_key=True, max_length=64)
    holder: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
