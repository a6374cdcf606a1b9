"""A retrain run records every challenger it trained and the evidence the gate decided on.

Revision ID: retrain_0002
Revises: feedback_0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "retrain_0002"
down_revision: str | Sequence[str] | None = "feedback_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("retrain_run") as batch:
        batch.add_column(sa.Column("candidates", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("gate_evidence", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retrain_run") as batch:
        batch.drop_column("gate_evidence")
        batch.drop_column("candidates")
