"""Labels belong to the principal that sent them: a free-text note, reviewer confirmation, shared rate windows.

The body's `source` used to name a label's source, and `annotation` was trusted by default, so anyone could claim
it. From here the source is the sending principal; what a client wrote is kept as a note, and labels that were
accepted only because they claimed a trusted source (their source is not trusted in `feedback_source`) go back
to vetting.

Revision ID: feedback_0002
Revises: access_0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "feedback_0002"
down_revision: str | Sequence[str] | None = "access_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("note", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("confirmed_by", sa.String(length=64), nullable=True))
    op.create_table(
        "rate_window",
        sa.Column("principal", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("principal", "window_start"),
    )
    op.execute(
        sa.text(
            "UPDATE feedback SET status = 'pending', "
            "status_reason = 'accepted only because it claimed a trusted source: back to vetting' "
            "WHERE status = 'accepted' AND status_reason LIKE 'trusted source %' "
            "AND source NOT IN (SELECT source FROM feedback_source WHERE trusted)"
        )
    )


def downgrade() -> None:
    op.drop_table("rate_window")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("confirmed_by")
        batch.drop_column("note")
