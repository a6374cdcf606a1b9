"""Feedback store, ingestion, vetting and review-queue options."""

from __future__ import annotations

from pydantic import Field

from flywheel.settings.core import FlywheelSettings


class FeedbackSettings(FlywheelSettings):
    """Feedback store, ingestion, vetting and review queue."""

    feedback_grace_seconds: float = Field(
        3600.0, gt=0, description="Feedback whose prediction is still not ingested after this many seconds is rejected."
    )
    feedback_max_comment_chars: int = Field(2000, ge=0, description="Longest feedback comment accepted, in characters.")
    feedback_rate_limit: int = Field(
        120,
        ge=0,
        description="Feedback requests accepted per minute from each client principal (and from anonymous callers), "
        "counted across all service workers and hosts; 0 = no limit.",
    )
    feedback_rate_limit_annotator: int = Field(
        3000,
        ge=0,
        description="Feedback requests accepted per minute from each annotator; 0 = no limit. Reviewers and admins "
        "are not limited.",
    )
    feedback_commit_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Longest a /feedback request waits for concurrent ones to share its database transaction (group "
        "commit), in milliseconds; it waits only while fewer have joined than were in flight at once before, so a "
        "lone client never waits. Each is answered 202 only once its transaction has committed; 0 = no waiting (a "
        "transaction still takes every request that queued while the previous one committed).",
    )
    feedback_label_issue_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Labels from untrusted sources whose cleanlab label-quality score (normalized margin) is below "
        "this wait for a reviewer as possible label errors (0.3 = the model gives another of two labels >= 0.7).",
    )
    feedback_quarantine_min_scored: int = Field(
        20, ge=1, description="Scored labels a source needs before it can be quarantined."
    )
    feedback_quarantine_rate: float = Field(
        0.5,
        gt=0,
        le=1,
        description="An untrusted source is quarantined once at least this share of its scored labels are possible "
        "label errors; its accepted, unused labels go back to review.",
    )
    ingest_group_id: str = Field("flywheel-ingest", description="Kafka consumer group of `flywheel ingest`.")
    ingest_batch_size: int = Field(500, ge=1, le=10_000, description="Most events written per database transaction.")
    ingest_max_poll_interval_ms: int = Field(
        5000, ge=1000, description="Kafka max.poll.interval.ms of the ingest consumer (also its group-join delay)."
    )
    ingest_retry_max_seconds: float = Field(
        30.0, gt=0, description="Longest pause between retries while the database or broker is unreachable."
    )
    ingest_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port for the ingest consumer's Prometheus metrics; unset = no endpoint."
    )
    review_window_hours: float = Field(
        168.0, gt=0, description="Only predictions this recent are offered in the review queue."
    )
    review_similarity: float = Field(
        0.8, gt=0, le=1, description="Word-set Jaccard similarity at which review-queue texts count as near-duplicates."
    )
    desk_lease_seconds: float = Field(
        600.0,
        gt=0,
        description="How long the annotation desk keeps an item leased to the annotator it was shown to (renewed "
        "while they view it); after that another annotator may get it.",
    )
    retention_days: float = Field(
        30.0,
        gt=0,
        description="Predictions (and their texts) older than this many days are deleted by the worker's "
        "housekeeping, unless feedback refers to them.",
    )
