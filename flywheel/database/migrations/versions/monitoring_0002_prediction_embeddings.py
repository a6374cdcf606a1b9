"""Stored drift-encoder embeddings of logged predictions, so drift reports need not re-embed their window.

Revision ID: monitoring_0002
Revises: retrain_0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "monitoring_0002"
down_revision: str | Sequence[str] | None = "retrain_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prediction_embedding",
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("encoder", sa.String(length=64), nullable=False),
        sa.Column("dims", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["prediction_id"], ["prediction.prediction_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("prediction_id", "encoder"),
    )


def downgrade() -> None:
    op.drop_table("prediction_embedding")
