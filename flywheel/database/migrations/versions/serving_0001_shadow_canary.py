"""Shadow and canary challengers: the deployment of a challenger beside the champion, and shadow predictions.

Revision ID: serving_0001
Revises: feedback_0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "serving_0001"
down_revision: str | Sequence[str] | None = "feedback_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployment",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("deployment_id", sa.String(length=64), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=True),
        sa.Column("champion_version", sa.String(length=64), nullable=True),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("feedback_ids", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("started_by", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_by", sa.String(length=64), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("evidence", sa.JSON(none_as_null=True), nullable=True),
        sa.CheckConstraint("mode IN ('shadow', 'canary')", name="ck_deployment_mode"),
        sa.CheckConstraint("share > 0 AND share <= 1", name="ck_deployment_share"),
        sa.PrimaryKeyConstraint("deployment_id"),
    )
    op.create_index("uq_deployment_active", "deployment", ["active"], unique=True)
    op.create_index("ix_deployment_version", "deployment", ["version"])
    op.create_index("ix_deployment_run_id", "deployment", ["run_id"])
    op.create_index("ix_deployment_started_at", "deployment", ["started_at"])
    op.create_table(
        "shadow_prediction",
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("deployment_id", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("served_version", sa.String(length=64), nullable=False),
        sa.Column("served_label", sa.String(length=128), nullable=False),
        sa.Column("served_confidence", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prediction_id", "deployment_id"),
    )
    op.create_index("ix_shadow_prediction_deployment_created_at", "shadow_prediction", ["deployment_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_shadow_prediction_deployment_created_at", table_name="shadow_prediction")
    op.drop_table("shadow_prediction")
    op.drop_index("ix_deployment_started_at", table_name="deployment")
    op.drop_index("ix_deployment_run_id", table_name="deployment")
    op.drop_index("ix_deployment_version", table_name="deployment")
    op.drop_index("uq_deployment_active", table_name="deployment")
    op.drop_table("deployment")
