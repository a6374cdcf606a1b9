"""Which labels feedback may use: the champion's, plus the ones an admin added with ``flywheel labels add``.

A label the model lacks is refused (422) rather than stored and silently dropped at the next retrain; each refusal
is counted by label name, so an admin sees the demand for a label before adding it. Once added, feedback with it
is stored, and the next retrain with rows of it grows the head (``retrain.pipeline``). This lives in the core
because the feedback package refuses and counts while the retrain package reads the added labels.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from flywheel.database import Database
from flywheel.errors import FlywheelError
from flywheel.models.access import AuditEntry
from flywheel.models.labels import Label, LabelCreate, LabelPublic, RefusedLabel

#: Distinct refused names counted one by one; the names after them share ``OTHER_NAMES``, so a flood of invented
#: names cannot grow the table without bound.
MAX_REFUSED_NAMES = 200
OTHER_NAMES = "(other names)"
#: Allowed names shown in a refusal; a model with hundreds of labels would otherwise answer with all of them.
_SHOWN = 20


class UnknownLabelError(FlywheelError, ValueError):
    """Feedback names a label the model lacks and no admin added (answered 422)."""


class LabelSet:
    """The labels an admin added, and the refusals of labels nobody allowed, in one database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def add(self, create: LabelCreate, added_by: str) -> tuple[LabelPublic, bool]:
        """Allow ``create.name`` (audited); returns the label and whether it is new (adding it again changes
        nothing)."""
        name = check_name(create.name)
        with self.database.session() as session:
            row = session.get(Label, name)
            if row is not None:
                return LabelPublic.model_validate(row, from_attributes=True), False
            row = Label(name=name, note=create.note, added_by=added_by)
            session.add(row)
            session.add(AuditEntry(actor=added_by, action="label.add", target=name, detail={"note": create.note}))
            session.flush()
            return LabelPublic.model_validate(row, from_attributes=True), True

    def added(self) -> list[LabelPublic]:
        """The labels admins added, oldest first."""
        with self.database.read_session() as session:
            rows = session.exec(select(Label).order_by(col(Label.created_at), col(Label.name))).all()
            return [LabelPublic.model_validate(row, from_attributes=True) for row in rows]

    def added_names(self) -> list[str]:
        """Names of the added labels, sorted."""
        return sorted(label.name for label in self.added())

    def refusals(self) -> dict[str, int]:
        """Refused feedback per label name (names past ``MAX_REFUSED_NAMES`` under ``OTHER_NAMES``)."""
        with self.database.read_session() as session:
            return {row.name: row.count for row in session.exec(select(RefusedLabel).order_by(col(RefusedLabel.name)))}

    @staticmethod
    def check_in(session: Session, label: str, model_labels: Collection[str] | None, now: datetime) -> None:
        """Refuse ``label`` (UnknownLabelError, counted in ``session``) unless the model has it or an admin added it.

        ``model_labels`` None (no model serves yet) allows every label: there is nothing to compare with.
        """
        if model_labels is None or label in model_labels:
            return
        if session.get(Label, label) is not None:
            return
        _count_refusal(session, label, now)
        allowed = sorted({*model_labels, *session.exec(select(Label.name)).all()})
        shown = ", ".join(allowed[:_SHOWN]) + (f" and {len(allowed) - _SHOWN} more" if len(allowed) > _SHOWN else "")
        raise UnknownLabelError(
            f"unknown label {label[:130]!r}: the model knows {shown}; an admin can allow a new label with "
            "`flywheel labels add NAME`, and the next retrain learns it"
        )


def check_name(name: str) -> str:
    """``name`` stripped, if it can be a label (1-128 characters, not blank, no control characters)."""
    stripped = name.strip()
    if not stripped or len(stripped) > 128 or any(ord(char) < 32 for char in stripped):
        raise UnknownLabelError(f"invalid label name {name[:130]!r}: use 1-128 printable characters")
    return stripped


def _count_refusal(session: Session, label: str, now: datetime) -> None:
    """Add one to ``label``'s refusals with an upsert, so concurrent workers never collide on a new name."""
    known = session.get(RefusedLabel, label) is not None
    if not known and session.exec(select(func.count()).select_from(RefusedLabel)).one() >= MAX_REFUSED_NAMES:
        label = OTHER_NAMES
    table: Any = RefusedLabel.__table__  # type: ignore[attr-defined]
    insert = postgres_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(table).values(name=label, count=1, first_seen=now, last_seen=now)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[table.c.name], set_={"count": table.c.count + 1, "last_seen": now}
        )
    )
