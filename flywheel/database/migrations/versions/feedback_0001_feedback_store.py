"""Feedback store: predictions ingested from Kafka, feedback, and per-source reliability.

Revision ID: feedback_0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "feedback_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNLINKED = sa.text("prediction_id IS NULL")


def upgrade() -> None:
    op.create_table(
        "prediction",
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("client_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("text_key", sa.String(length=40), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prediction_id"),
    )
    op.create_index("ix_prediction_created_at", "prediction", ["created_at"])
    op.create_index("ix_prediction_margin", "prediction", ["margin"])
    op.create_index("ix_prediction_model_version", "prediction", ["model_version"])
    op.create_index("ix_prediction_text_key", "prediction", ["text_key"])

    op.create_table(
        "feedback",
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("feedback_id", sa.String(length=64), nullable=False),
        sa.Column("prediction_id", sa.String(length=64), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("text_key", sa.String(length=40), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.String(length=500), nullable=True),
        sa.Column("used_by_version", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("model_scores", sa.JSON(), nullable=True),
        sa.Column("model_label", sa.String(length=128), nullable=True),
        sa.Column("model_confidence", sa.Float(), nullable=True),
        sa.Column("label_quality", sa.Float(), nullable=True),
        sa.Column("label_issue", sa.Boolean(), nullable=False),
        sa.Column("conflict", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('pending', 'accepted', 'rejected', 'used')", name="ck_feedback_status"),
        sa.PrimaryKeyConstraint("feedback_id"),
        sa.UniqueConstraint("prediction_id", "source", name="uq_feedback_prediction_source"),
    )
    op.create_index("ix_feedback_status_created_at", "feedback", ["status", "created_at"])
    op.create_index("ix_feedback_text_key", "feedback", ["text_key"])
    op.create_index("ix_feedback_used_by_version", "feedback", ["used_by_version"])
    op.create_index(
        "uq_feedback_source_text_key",
        "feedback",
        ["source", "text_key"],
        unique=True,
        sqlite_where=_UNLINKED,
        postgresql_where=_UNLINKED,
    )

    op.create_table(
        "feedback_source",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.Column("quarantined", sa.Boolean(), nullable=False),
        sa.Column("quarantine_reason", sa.String(length=500), nullable=True),
        sa.Column("scored", sa.Integer(), nullable=False),
        sa.Column("label_issues", sa.Integer(), nullable=False),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("source"),
    )


def downgrade() -> None:
    op.drop_table("feedback_source")
    op.drop_index("uq_feedback_source_text_key", table_name="feedback")
    op.drop_index("ix_feedback_used_by_version", table_name="feedback")
    op.drop_index("ix_feedback_text_key", table_name="feedback")
    op.drop_index("ix_feedback_status_created_at", table_name="feedback")
    op.drop_table("feedback")
    op.drop_index("ix_prediction_text_key", table_name="prediction")
    op.drop_index("ix_prediction_model_version", table_name="prediction")
    op.drop_index("ix_prediction_margin", table_name="prediction")
    op.drop_index("ix_prediction_created_at", table_name="prediction")
    op.drop_table("prediction")
