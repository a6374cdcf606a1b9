"""Retrain worker options: triggers, the challenger's training data, the promotion gate, housekeeping."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from flywheel.settings.core import FlywheelSettings


class RetrainSettings(FlywheelSettings):
    """Retrain worker."""

    retrain_interval_seconds: int = Field(
        900, ge=10, description="Seconds between the worker's retrain checks (schedule trigger)."
    )
    retrain_min_new_labels: int = Field(
        100, ge=1, description="Accepted, unused feedback labels that trigger a retrain at the next check."
    )
    retrain_candidates: Annotated[list[Literal["warm", "gentle", "bold", "eager", "probe", "base"]], NoDecode] = Field(
        ["warm", "bold"],
        min_length=1,
        description="Challenger recipes one run trains, in order, comma-separated: warm (from the champion), "
        "gentle (half the learning rate), bold (twice the learning rate), eager (twice the feedback weight), probe "
        "(the champion's encoder with its head refit as a linear probe), base (the base model with a linear-probe "
        "head).",
    )
    retrain_refit: bool = Field(
        True,
        description="Once the gate promotes a candidate, train its recipe once more with the held-out slice among its "
        "rows (every fresh label) and serve that model instead, if it keeps the retained rows against the champion "
        "and the candidate; the slice's labels are then used. The slice judged the recipe; off, the candidate "
        "itself serves and the slice's labels wait for the next run.",
    )
    retrain_time_budget_minutes: float = Field(
        15.0,
        gt=0,
        description="Wall time of one run's candidates: no further candidate starts once the longest so far (and, "
        "with FLYWHEEL_RETRAIN_REFIT, one more model's time for the refit) would not fit.",
    )
    retrain_feedback_weight: float = Field(
        3.0,
        gt=0,
        description="Loss weight of a trusted or reviewer-confirmed feedback row relative to a replayed original "
        "training row.",
    )
    retrain_untrusted_weight: float = Field(
        1.0,
        gt=0,
        description="Loss weight of a feedback row from an untrusted source that vetting accepted: it counts no "
        "more than an original row, so labels nobody vouched for cannot outweigh what the model knew.",
    )
    retrain_self_training: bool = Field(
        False,
        description="Add the champion's confident predictions on recent traffic to a retrain as low-weight labels "
        "(self-training). Off by default: the loop benchmark did not show it helps (see README).",
    )
    retrain_self_training_min_confidence: float = Field(
        0.95, gt=0.5, le=1, description="Lowest confidence of a prediction that self-training may take as a label."
    )
    retrain_self_training_hours: float = Field(
        168.0, gt=0, description="Age of the oldest prediction self-training reads, in hours."
    )
    retrain_self_training_max_per_class: int = Field(
        200, ge=1, description="Most self-training rows per predicted label (the most confident first)."
    )
    retrain_self_training_weight: float = Field(
        0.3, gt=0, description="Loss weight of a self-training row relative to a replayed original training row."
    )
    retrain_replay_rows: int = Field(
        20_000, ge=0, description="Most rows of the champion's training data replayed so the model keeps what it knew."
    )
    retrain_folds: int = Field(
        2,
        ge=1,
        le=10,
        description="Folds of the fresh trusted labels that judge a recipe (cross-fitting): each fold is held out from "
        "one model of the recipe and judged by it, so every trusted label judges a model that never learned it; "
        "1: a single held-out slice of FLYWHEEL_RETRAIN_EVAL_FRACTION judges. A fold model never serves while "
        "FLYWHEEL_RETRAIN_REFIT trains the recipe once more on every label.",
    )
    retrain_eval_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="With FLYWHEEL_RETRAIN_FOLDS=1: share of fresh trusted feedback texts held out from the "
        "candidates' training to judge them against the champion (only trusted or reviewer-confirmed labels judge a "
        "challenger).",
    )
    retrain_min_eval_rows: int = Field(
        30,
        ge=1,
        description="Fewest trusted held-out feedback rows a gate decides on (fewer cannot resolve a macro-F1 "
        "difference); with fewer the run is skipped.",
    )
    retrain_max_principal_share: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Most of a retrain's feedback training rows that one untrusted source may supply (its newest "
        "labels are kept); trusted sources and reviewer-confirmed labels are exempt.",
    )
    retrain_min_gain: float = Field(
        0.0,
        ge=0,
        description="Held-out feedback macro-F1 gain over the champion that the lower end of its bootstrap "
        "interval must exceed.",
    )
    retrain_gain_confidence: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="Confidence of the paired-bootstrap interval of the feedback gain (0.9: its lower end is a "
        "one-sided 95% bound).",
    )
    retrain_max_holdout_drop: float = Field(
        0.01,
        ge=0,
        description="Most macro-F1 on the retained rows (the golden holdout plus the champion's validation rows) a "
        "challenger may lose against the champion, and another candidate against the run's reference (0.01 = 1 pt); "
        "on n retained rows at least 1/n (one row's change), which fewer rows cannot resolve.",
    )
    retrain_holdout_confidence: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Confidence of the paired-bootstrap interval of a drop on the retained rows: a drop beyond "
        "`FLYWHEEL_RETRAIN_MAX_HOLDOUT_DROP` or `FLYWHEEL_RETRAIN_MAX_CLASS_DROP` refuses only when the interval lies "
        "below zero (0.8: a one-sided 90% bound that the challenger is worse; closer to 1 lets more drops through).",
    )
    retrain_max_class_drop: float = Field(
        0.03,
        ge=0,
        description="Most F1 on the retained rows any one class may lose against the champion (0.03 = 3 pts); "
        "for a class of n rows, at least 1/n (one row's change), which fewer rows cannot resolve.",
    )
    retrain_shadow_minutes: float = Field(
        0.0,
        ge=0,
        description="A challenger that passes the gate is first deployed as a shadow for this many minutes and "
        "promoted only if its shadow predictions meet FLYWHEEL_RETRAIN_SHADOW_*; 0 = off (promoted at once).",
    )
    retrain_shadow_sample: float = Field(
        0.2, gt=0, le=1, description="Share of live requests the shadow phase's challenger also scores."
    )
    retrain_shadow_min_predictions: int = Field(
        200,
        ge=1,
        description="Fewest shadow predictions the shadow phase decides on; with fewer when its time is up, the "
        "challenger is not promoted.",
    )
    retrain_shadow_min_agreement: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Least share of shadowed requests on which the challenger must give the served label.",
    )
    retrain_shadow_max_accuracy_drop: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Most the challenger's accuracy on trusted feedback for the shadowed requests may fall below "
        "the served model's on the same requests (0.02 = 2 points).",
    )
    challenger_check_seconds: float = Field(
        30.0,
        gt=0,
        description="Seconds between the worker's checks of the deployed challenger: a canary worse on feedback is "
        "withdrawn, a shadow phase that is due is decided.",
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

    @field_validator("retrain_candidates", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``warm,gentle`` from the environment becomes a list."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value
