"""Tables of the label set: labels an admin allowed beyond the champion's, and feedback refused for its label."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Text
from sqlmodel import Field, SQLModel

from flywheel.database.types import UTCDateTime
from flywheel.events import utcnow


class LabelBase(SQLModel):
    """A label name feedback may use although the champion has no output for it yet."""

    name: str = Field(primary_key=True, min_length=1, max_length=128)
    #: Why it was added, for the people reading `flywheel labels list`.
    note: str | None = Field(default=None, sa_type=Text)


class LabelCreate(LabelBase):
    """What `flywheel labels add` takes."""


class Label(LabelBase, table=True):
    """An allowed label: feedback with it is stored, and the next retrain that has rows of it grows the head."""

    __tablename__ = "label"

    added_by: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class LabelPublic(LabelBase):
    """An allowed label as the CLI shows it."""

    added_by: str
    created_at: datetime


class RefusedLabelBase(SQLModel):
    """How often feedback named a label nobody allowed: the demand an admin reads before `flywheel labels add`."""

    name: str = Field(primary_key=True, max_length=128)
    count: int = 0
    first_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class RefusedLabel(RefusedLabelBase, table=True):
    """Refusals counted per label name; names past a fixed number share one row, so a flood cannot grow it."""

    __tablename__ = "refused_label"


class RefusedLabelPublic(RefusedLabelBase):
    """Refusals of one label name."""
