"""Tables of the annotation desk: the lease that gives a review item to one annotator at a time, and the entries
recording what each annotator did at the desk (the labels they gave, for undo and progress, and their skips)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, Index, String
from sqlmodel import Field, SQLModel

from flywheel.database.types import UTCDateTime
from flywheel.events import new_id, utcnow


class DeskAction(StrEnum):
    """What an annotator did with an item at the desk."""

    LABEL = "label"
    SKIP = "skip"


class DeskLeaseBase(SQLModel):
    """Who works on a review item, until when."""

    #: The item is its text (``flywheel.text.text_key``): near-identical predictions of one text are one item.
    text_key: str = Field(primary_key=True, max_length=40)
    prediction_id: str = Field(max_length=64)
    principal: str = Field(max_length=64, index=True)
    taken_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)


class DeskLease(DeskLeaseBase, table=True):
    """One row per leased text; the primary key makes two annotators' claims on one text exclusive."""

    __tablename__ = "desk_lease"


class DeskLeasePublic(DeskLeaseBase):
    """A lease as the desk shows it."""


class DeskEntryBase(SQLModel):
    """One thing an annotator did at the desk."""

    principal: str = Field(max_length=64)
    #: Digest of the browser session (or key) it was done in: undo withdraws only this session's labels.
    session: str = Field(max_length=64)
    prediction_id: str = Field(max_length=64)
    text_key: str = Field(max_length=40)
    action: str = Field(sa_type=String(16))
    #: The label given (``action`` label); None for a skip.
    feedback_id: str | None = Field(default=None, max_length=64)


class DeskEntry(DeskEntryBase, table=True):
    """Labels and skips per annotator; an undone label's entry is deleted with the label."""

    __tablename__ = "desk_entry"
    __table_args__ = (
        Index("ix_desk_entry_principal_created_at", "principal", "created_at"),
        Index("ix_desk_entry_principal_text_key", "principal", "text_key"),
        CheckConstraint("action IN ('label', 'skip')", name="ck_desk_entry_action"),
    )

    entry_id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeskEntryPublic(DeskEntryBase):
    """An entry as the desk shows it."""

    entry_id: str
    created_at: datetime
