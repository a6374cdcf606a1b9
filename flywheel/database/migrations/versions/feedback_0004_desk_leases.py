"""The annotation desk: leases that give a review item (a text) to one annotator at a time, and what each
annotator did there (labels, for undo and progress; skips, so an item skipped is not offered to them again).

Revision ID: feedback_0004
Revises: feedback_0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "feedback_0004"
down_revision: str | Sequence[str] | None = "feedback_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "desk_lease",
        sa.Column("text_key", sa.String(length=40), nullable=False),
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("principal", sa.String(length=64), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("text_key"),
    )
    op.create_index("ix_desk_lease_principal", "desk_lease", ["principal"])
    op.create_index("ix_desk_lease_expires_at", "desk_lease", ["expires_at"])
    op.create_table(
        "desk_entry",
        sa.Column("entry_id", sa.String(length=64), nullable=False),
        sa.Column("principal", sa.String(length=64), nullable=False),
        sa.Column("session", sa.String(length=64), nullable=False),
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("text_key", sa.String(length=40), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("feedback_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("action IN ('label', 'skip')", name="ck_desk_entry_action"),
        sa.PrimaryKeyConstraint("entry_id"),
    )
    op.create_index("ix_desk_entry_principal_created_at", "desk_entry", ["principal", "created_at"])
    op.create_index("ix_desk_entry_principal_text_key", "desk_entry", ["principal", "text_key"])


def downgrade() -> None:
    op.drop_index("ix_desk_entry_principal_text_key", table_name="desk_entry")
    op.drop_index("ix_desk_entry_principal_created_at", table_name="desk_entry")
    op.drop_table("desk_entry")
    op.drop_index("ix_desk_lease_expires_at", table_name="desk_lease")
    op.drop_index("ix_desk_lease_principal", table_name="desk_lease")
    op.drop_table("desk_lease")
