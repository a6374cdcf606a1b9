"""Drift reports and the predictions drift sends to the front of the review queue.

Revision ID: monitoring_0001
Revises: retrain_0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "monitoring_0001"
down_revision: str | Sequence[str] | None = "retrain_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_report",
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verdict", sa.String(length=24), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_rule", sa.String(length=200), nullable=False),
        sa.Column("current_rows", sa.Integer(), nullable=False),
        sa.Column("served_rows", sa.Integer(), nullable=False),
        sa.Column("feedback_rows", sa.Integer(), nullable=False),
        sa.Column("reference_rows", sa.Integer(), nullable=False),
        sa.Column("drift_score", sa.Float(), nullable=True),
        sa.Column("fired", sa.JSON(), nullable=False),
        sa.Column("signals", sa.JSON(), nullable=False),
        sa.Column("estimated_accuracy", sa.Float(), nullable=True),
        sa.Column("realised_accuracy", sa.Float(), nullable=True),
        sa.Column("targeted", sa.Integer(), nullable=False),
        sa.Column("alert_event_id", sa.String(length=64), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=False),
        sa.Column("message", sa.String(length=1000), nullable=False),
        sa.Column("report_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("report_id"),
    )
    op.create_index("ix_drift_report_created_at", "drift_report", ["created_at"])
    op.create_index("ix_drift_report_model_version", "drift_report", ["model_version"])
    op.create_index("ix_drift_report_verdict", "drift_report", ["verdict"])
    op.create_table(
        "drift_target",
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("report_id", sa.String(length=64), nullable=False),
        sa.Column("drift_score", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prediction_id"),
    )
    op.create_index("ix_drift_target_created_at", "drift_target", ["created_at"])
    op.create_index("ix_drift_target_report_id", "drift_target", ["report_id"])


def downgrade() -> None:
    op.drop_index("ix_drift_target_report_id", table_name="drift_target")
    op.drop_index("ix_drift_target_created_at", table_name="drift_target")
    op.drop_table("drift_target")
    op.drop_index("ix_drift_report_verdict", table_name="drift_report")
    op.drop_index("ix_drift_report_model_version", table_name="drift_report")
    op.drop_index("ix_drift_report_created_at", table_name="drift_report")
    op.drop_table("drift_report")
