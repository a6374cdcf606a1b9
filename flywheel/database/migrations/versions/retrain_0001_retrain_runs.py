"""Retrain runs and the retrain lease.

Revision ID: retrain_0001
Revises: feedback_0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "retrain_0001"
down_revision: str | Sequence[str] | None = "feedback_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "retrain_run",
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("champion_version", sa.String(length=64), nullable=True),
        sa.Column("challenger_version", sa.String(length=64), nullable=True),
        sa.Column("original_rows", sa.Integer(), nullable=False),
        sa.Column("feedback_rows", sa.Integer(), nullable=False),
        sa.Column("feedback_train_rows", sa.Integer(), nullable=False),
        sa.Column("feedback_eval_rows", sa.Integer(), nullable=False),
        sa.Column("champion_metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("challenger_metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("run_id"),
    )
    op.create_index("ix_retrain_run_status", "retrain_run", ["status"])
    op.create_index("ix_retrain_run_created_at", "retrain_run", ["created_at"])
    op.create_table(
        "retrain_lease",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.bulk_insert(sa.table("retrain_lease", sa.column("name", sa.String)), [{"name": "retrain"}])


def downgrade() -> None:
    op.drop_table("retrain_lease")
    op.drop_index("ix_retrain_run_created_at", table_name="retrain_run")
    op.drop_index("ix_retrain_run_status", table_name="retrain_run")
    op.drop_table("retrain_run")
