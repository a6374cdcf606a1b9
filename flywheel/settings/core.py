"""State, database, broker, event publishing, logging and seed: what every Flywheel process needs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FlywheelSettings(BaseSettings):
    """Base of every concern: its fields are read from ``FLYWHEEL_<NAME>``, unknown variables are ignored."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")


class CoreSettings(FlywheelSettings):
    """State, database, broker, event publishing, logs and seed."""

    home: Path = Field(Path(".flywheel"), description="State directory: registry, holdout, spill files, reports.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the feedback store; default SQLite file `<home>/flywheel.db`."
    )
    database_ready_timeout: float = Field(
        30.0, gt=0, description="Seconds startup waits for the database to accept connections before giving up."
    )
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    # The event publisher is core: the service, ingestion, worker and drift watcher all publish through it.
    publish_queue_size: int = Field(
        10_000,
        ge=1,
        description="Most events a process holds only in memory (queued, or sent and not yet acknowledged by Kafka); "
        "beyond it publish() writes them to the spill file itself. A SIGKILL loses at most these.",
    )
    spill_max_bytes: int = Field(
        1_073_741_824, ge=0, description="Disk cap of a process's spill file; events beyond it are dropped and counted."
    )
    spill_fsync_ms: float = Field(
        20.0,
        ge=0,
        description="Spill appends are fsynced within this many milliseconds (appends in between share one fsync: "
        "group commit), so a power loss loses at most the events spilled in the last this many ms plus one fsync; "
        "0 = fsync every append.",
    )
    kafka_timeout: float = Field(
        10.0, gt=0, description="Seconds an event may wait for the broker's acknowledgement before it is spilled."
    )
    kafka_retry_interval: float = Field(
        2.0, gt=0, description="Seconds between reconnection attempts while events are being spilled."
    )
    log_json: bool = Field(False, description="Write logs as JSON lines instead of text.")
    log_level: str = Field("INFO", description="Log level of Flywheel's loggers.")
    seed: int = Field(42, description="Seed for splits, shuffling and weight initialisation.")

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
