"""Tables of challengers deployed beside the champion: the shadow or canary deployment, and shadow predictions.

A deployment row says which version is the challenger, how (shadow: a sample of requests is also scored by it and
logged, never returned; canary: a share of callers is answered by it), since when and by whom, and once it ended,
how and why. Every service replica reads the active row, so they all agree. At most one deployment is active at a
time: the unique index on ``active`` (true while active, NULL once ended, and NULLs are distinct) lets the database
refuse a second one even when two operators start one at the same moment.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import ConfigDict
from sqlalchemy import JSON, CheckConstraint, Index, String, Text
from sqlmodel import Field, SQLModel

from flywheel.database.types import UTCDateTime
from flywheel.events import new_id, utcnow


class DeploymentMode(StrEnum):
    """How a challenger meets live traffic."""

    #: A sample of requests is also scored by the challenger; its predictions are logged, never returned.
    SHADOW = "shadow"
    #: A share of callers (by principal or client id) is answered by the challenger.
    CANARY = "canary"


class DeploymentOutcome(StrEnum):
    """How a deployment ended."""

    #: A person stopped a shadow.
    STOPPED = "stopped"
    #: A canary was withdrawn, by a person or automatically (``ended_by`` says who).
    WITHDRAWN = "withdrawn"
    #: The challenger became champion.
    PROMOTED = "promoted"
    #: A retrain's shadow phase ended without promoting its challenger.
    REFUSED = "refused"
    #: Another challenger was deployed in its place.
    REPLACED = "replaced"


class DeploymentBase(SQLModel):
    """Which version is deployed beside the champion, and how."""

    version: str = Field(max_length=64, index=True)
    mode: str = Field(sa_type=String(16))
    #: Shadow: the share of requests also scored; canary: the share of callers answered.
    share: float


class DeploymentCreate(DeploymentBase):
    """What an operator, or the retrain gate, asks for."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    #: The retrain run whose challenger this is (its shadow phase), if any.
    run_id: str | None = Field(default=None, max_length=64)
    #: Labels the run's challenger learned from: marked used if it is promoted.
    feedback_ids: list[str] | None = None


class Deployment(DeploymentBase, table=True):
    """One deployment of a challenger, from its start to its end."""

    __tablename__ = "deployment"
    __table_args__ = (
        Index("uq_deployment_active", "active", unique=True),
        CheckConstraint("mode IN ('shadow', 'canary')", name="ck_deployment_mode"),
        CheckConstraint("share > 0 AND share <= 1", name="ck_deployment_share"),
    )

    deployment_id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    #: True while active, NULL once ended: the unique index allows one active row.
    active: bool | None = Field(default=True)
    #: The champion when it started: what its figures are compared with.
    champion_version: str | None = Field(default=None, max_length=64)
    run_id: str | None = Field(default=None, max_length=64, index=True)
    feedback_ids: list[str] | None = Field(default=None, sa_type=JSON(none_as_null=True))
    started_by: str = Field(max_length=64)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    ended_by: str | None = Field(default=None, max_length=64)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    outcome: str | None = Field(default=None, sa_type=String(16))
    reason: str | None = Field(default=None, sa_type=Text)
    #: The figures the deployment ended on (its comparison with the champion), kept after its rows expire.
    evidence: dict[str, Any] | None = Field(default=None, sa_type=JSON(none_as_null=True))


class DeploymentPublic(DeploymentBase):
    """A deployment as the API, the CLI and the model page show it."""

    deployment_id: str
    champion_version: str | None
    run_id: str | None
    started_by: str
    started_at: datetime
    ended_by: str | None
    ended_at: datetime | None
    outcome: str | None
    reason: str | None
    evidence: dict[str, Any] | None


class ShadowPredictionBase(SQLModel):
    """What a shadow challenger said about a live request, beside what the serving model answered."""

    #: The live prediction this shadows: the id the caller got, of the served model's answer.
    prediction_id: str = Field(primary_key=True, max_length=64)
    deployment_id: str = Field(primary_key=True, max_length=64)
    model_version: str = Field(max_length=64)
    label: str = Field(max_length=128)
    confidence: float
    scores: dict[str, float] = Field(sa_type=JSON)
    truncated: bool = False
    served_version: str = Field(max_length=64)
    served_label: str = Field(max_length=128)
    served_confidence: float
    created_at: datetime = Field(sa_type=UTCDateTime)


class ShadowPrediction(ShadowPredictionBase, table=True):
    """One row per shadowed request, ingested from ``flywheel.predictions``; kept apart from ``prediction``, so
    drift windows, label shares and the review queue never see it."""

    __tablename__ = "shadow_prediction"
    __table_args__ = (Index("ix_shadow_prediction_deployment_created_at", "deployment_id", "created_at"),)

    ingested_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
