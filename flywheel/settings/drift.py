"""Drift monitoring options: the windows, Evidently's methods and thresholds per signal, label shares, reports and
the alert webhook."""

from __future__ import annotations

from pydantic import Field

from flywheel.settings.core import FlywheelSettings


class DriftSettings(FlywheelSettings):
    """Drift monitoring."""

    drift_interval_seconds: int = Field(
        3600, ge=60, description="Seconds between scheduled drift reports (`flywheel drift watch`, retrain worker)."
    )
    drift_window_hours: float = Field(
        24.0, gt=0, description="The current window holds the predictions logged in the last this many hours."
    )
    drift_window_max_rows: int = Field(
        10_000, ge=1, description="Most recent predictions in the current window (the newest are kept)."
    )
    drift_min_rows: int = Field(
        200, ge=10, description="Fewer current predictions than this give an `insufficient_data` result, no verdict."
    )
    drift_reference_max_rows: int = Field(
        10_000, ge=100, description="Training rows sampled as the drift reference (cached per model version)."
    )
    drift_text_method: str = Field(
        "abs_text_content_drift",
        description="Evidently method for the raw text column (a domain classifier: its ROC AUC is the score).",
    )
    drift_text_threshold: float = Field(
        0.6, gt=0, description="Text content drift fires above this domain-classifier ROC AUC."
    )
    drift_embedding_method: str = Field(
        "model", description="Evidently embedding drift method on the drift encoder's sentence embeddings: "
        "model (domain classifier ROC AUC), distance, ratio or mmd."
    )
    drift_embedding_threshold: float = Field(
        0.6, gt=0, description="Embedding drift fires above this score of the embedding method."
    )
    drift_numeric_method: str = Field(
        "wasserstein", description="Evidently method for the text descriptors (numeric, normed by the reference)."
    )
    drift_numeric_threshold: float = Field(
        0.2,
        gt=0,
        description="Text-descriptor drift fires above this score (0.2 keeps 200-row windows of unchanged traffic "
        "quiet with the normed Wasserstein method).",
    )
    drift_confidence_method: str = Field(
        "ed",
        description="Evidently method for the prediction confidence; energy distance is not normed, as confidence "
        "has a fixed scale and a confident model's narrow spread would inflate normed scores.",
    )
    drift_confidence_threshold: float = Field(
        0.1, gt=0, description="Prediction-confidence drift fires above this score."
    )
    drift_label_method: str = Field(
        "jensenshannon", description="Evidently method for label columns: predicted labels and feedback labels."
    )
    drift_label_threshold: float = Field(
        0.1, gt=0, description="Predicted-label and feedback-label drift fire above this score."
    )
    drift_embedding_plot_rows: int = Field(
        250, ge=50, description="Rows per side in the report's two-dimensional picture of the embeddings."
    )
    drift_embedding_projection: str = Field(
        "pca",
        description="How that picture is drawn: pca (milliseconds), or tsne as Evidently does (seconds to tens of "
        "seconds on two shared cores, the slowest part of a report); the drift score does not depend on it.",
    )
    drift_min_signals: int = Field(
        1, ge=1, description="The report's verdict is `drifted` when at least this many signals fire."
    )
    drift_min_feedback_rows: int = Field(
        50, ge=1, description="Accepted feedback labels in the window needed before feedback-label drift is tested."
    )
    drift_keep_reports: int = Field(
        336, ge=1, description="Newest drift reports kept (HTML, JSON, row, targets); older ones are deleted after "
        "each run (336 = two weeks of hourly runs, about 1.3 GB of HTML)."
    )
    drift_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port for `flywheel drift watch`'s Prometheus metrics; unset = no endpoint."
    )
    drift_targeted_labels: int = Field(
        50, ge=0, description="On drift, this many of the window's requests least like the reference go to the "
        "front of the review queue; 0 = off."
    )
    drift_encoder_max_length: int = Field(
        128, ge=8, le=4096, description="Tokens per text the drift encoder (the base model, never fine-tuned) reads; "
        "part of the encoder's identity, so changing it starts a new embedding space."
    )
    drift_embed_at_ingest: bool = Field(
        True, description="`flywheel ingest` embeds each stored prediction once with the drift encoder in a "
        "background thread, so drift reports read stored embeddings instead of re-embedding the window."
    )
    drift_sample_rows: int = Field(
        4000, ge=200, description="Rows per side (reference, window) the report's tests run on: a seeded sample of "
        "each side when it is larger, enough for a stable verdict (domain-classifier AUC within about 0.01)."
    )
    drift_embed_batch_size: int = Field(
        64, ge=1, le=4096, description="Texts per batch the background drift embedder encodes and stores."
    )
    drift_label_share_max_diff: float = Field(
        0.15,
        gt=0,
        le=1,
        description="A predicted label's share of the current window may depart this far (absolute) from its share "
        "of the reference before a label-share alert is raised (both this and FLYWHEEL_DRIFT_LABEL_SHARE_MIN_Z).",
    )
    drift_label_share_min_z: float = Field(
        4.0,
        ge=0,
        description="A label-share alert also needs the departure to be this many standard errors of the reference "
        "share for the window's size (sqrt(p(1-p)/n)), so a small window's noise raises none.",
    )
    alert_webhook_url: str | None = Field(
        None,
        description="Every alert (drift and label share) is POSTed as JSON to this URL by the worker; unset = off.",
    )
    alert_webhook_timeout: float = Field(
        10.0, gt=0, description="Seconds one webhook attempt may take (connect, send, answer)."
    )
    alert_webhook_attempts: int = Field(
        5,
        ge=1,
        description="Attempts per alert, with exponential backoff between them; after the last the worker pauses "
        "(1 s, doubling up to 30 s) and tries the same alert again, so none is skipped unless the receiver refuses "
        "it with a 4xx other than 408 and 429.",
    )
