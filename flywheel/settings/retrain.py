"""Retrain worker options: triggers, the challenger's training data, the promotion gate, housekeeping."""

from __future__ import annotations

from pydantic import Field

from flywheel.settings.core import FlywheelSettings


class RetrainSettings(FlywheelSettings):
    """Retrain worker."""

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
        0.3,
        gt=0,
        lt=1,
        description="Share of fresh trusted feedback texts held out from training to compare the two models "
        "(only trusted or reviewer-confirmed labels judge a challenger).",
    )
    retrain_min_eval_rows: int = Field(
        10, ge=1, description="Fewest trusted held-out feedback rows a gate needs; with fewer the run is skipped."
    )
    retrain_max_principal_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Most of a retrain's feedback training rows that one untrusted source may supply (its newest "
        "labels are kept); trusted sources and reviewer-confirmed labels are exempt.",
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
