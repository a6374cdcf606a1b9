"""The challengers one retrain run trains: a small fixed grid of ways to learn from new labels.

What decides whether a retrain helps is how hard it pulls toward the new labels against what the champion knew
(learning rate, the weight of feedback rows) and where it starts (the champion as it is, or the champion's encoder
with its head refit as a linear probe on the new data). Each candidate is one such choice; the gate then takes the
best one that keeps the golden holdout.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from flywheel.classifier import Classifier
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.dataset import RetrainData
from retrain.evaluation import Metrics, predictions, score
from retrain.gate import GateScores
from retrain.pipeline import TrainingPipeline
from retrain.trainer import Trainer


class Start(StrEnum):
    """Where a candidate's fine-tuning starts."""

    #: The champion, encoder and head.
    WARM = "warm"
    #: The champion's encoder with its head refit by linear probing on the retrain set.
    PROBE = "probe"
    #: The base model with a linear-probe head: a fresh model on replayed and new rows alike.
    BASE = "base"


@dataclass(frozen=True)
class Candidate:
    """One challenger recipe: a start and scales on the settings' learning rate and feedback weight."""

    name: str
    start: Start
    learning_rate_scale: float = 1.0
    feedback_weight_scale: float = 1.0

    def settings(self, settings: Settings) -> Settings:
        """The training settings this candidate runs with."""
        return settings.model_copy(update={"learning_rate": settings.learning_rate * self.learning_rate_scale})

    def weights(self, train: pd.DataFrame) -> pd.Series:
        """Loss weights of the retrain rows: feedback rows (those with a feedback id) scaled by this candidate."""
        is_feedback = train["feedback_id"].notna()
        return train["weight"].where(~is_feedback, train["weight"] * self.feedback_weight_scale).astype(float)

    def describe(self, settings: Settings) -> dict[str, object]:
        """The recipe as recorded in the run: start, learning rate and feedback weight scale."""
        return {
            "start": self.start.value,
            "learning_rate": settings.learning_rate * self.learning_rate_scale,
            "feedback_weight_scale": self.feedback_weight_scale,
        }


#: Every recipe a run may try, by the name ``FLYWHEEL_RETRAIN_CANDIDATES`` lists it under.
GRID: dict[str, Candidate] = {
    candidate.name: candidate
    for candidate in (
        Candidate("warm", Start.WARM),
        Candidate("gentle", Start.WARM, learning_rate_scale=0.5),
        Candidate("bold", Start.WARM, learning_rate_scale=2.0),
        Candidate("eager", Start.WARM, feedback_weight_scale=2.0),
        Candidate("probe", Start.PROBE),
        Candidate("base", Start.BASE),
    )
}


def candidates(settings: Settings) -> list[Candidate]:
    """The recipes this run tries, in the order the settings list them."""
    return [GRID[name] for name in settings.retrain_candidates]


@dataclass
class Scored:
    """A model of a run scored for the gate: its scores, metrics, and predictions on the held-out feedback."""

    name: str
    version: ModelVersion
    scores: GateScores
    metrics: dict[str, Any]
    predicted: list[str]
    #: Why the gate may not choose it (it gave up too much of the golden holdout), or None.
    refused: str | None = None

    #: The models of this recipe scored one by one, one per fold of the judged feedback, each on its own fold
    #: (empty for a single model).
    parts: list[Scored] = field(default_factory=list)

    @property
    def folds(self) -> list[ModelVersion]:
        """The recipe's models, one per fold (just ``version`` with a single slice)."""
        return [part.version for part in self.parts] or [self.version]

    def trained_on_held_out(self) -> Scored:
        """The same model, known to have learned from the held-out feedback: it has no score there to compare."""
        scores = self.scores.model_copy(update={"feedback_macro_f1": math.nan})
        return replace(self, scores=scores, metrics={**self.metrics, "feedback": None})

    def record(self, candidate: Candidate, settings: Settings, seconds: float) -> dict[str, Any]:
        """This candidate as the run record keeps it: recipe, training, scores and the gate's refusal."""
        feedback = self.scores.feedback_macro_f1
        return {
            "name": self.name,
            "version": self.version.version,
            **candidate.describe(settings),
            "seconds": round(seconds, 1),
            "steps": self.version.card.steps_run,
            "weight_interpolation": self.version.card.weight_interpolation,
            "holdout_macro_f1": self.scores.holdout_macro_f1,
            "holdout_class_f1": self.scores.holdout_class_f1,
            "holdout_rows": self.scores.holdout_rows,
            "feedback_macro_f1": None if math.isnan(feedback) else feedback,
            "refused": self.refused,
            **({"folds": [version.version for version in self.folds]} if len(self.folds) > 1 else {}),
        }


def train_candidate(
    settings: Settings,
    registry: ModelRegistry,
    champion: ModelVersion,
    data: RetrainData,
    candidate: Candidate,
    *,
    progress: bool,
    stop: threading.Event,
) -> ModelVersion:
    """Fine-tune ``candidate``'s recipe on the run's rows and register the result (never promoted here)."""
    settings = candidate.settings(settings)
    pipeline = TrainingPipeline(settings, registry, Trainer(settings, progress=progress, stop=stop))
    train = data.train.assign(
        weight=candidate.weights(data.train),
        group=np.where(data.train["feedback_id"].notna(), "feedback", "original"),
        augment=data.train["feedback_id"].notna(),
    )
    outcome = pipeline.run(
        train,
        warm_start=None if candidate.start == Start.BASE else champion.version,
        promote=False,
        sample_weight_column="weight",
        probe=candidate.start == Start.PROBE,
        group_column="group",
        validation=data.validation,
        added_labels=data.labels,
        augment_column="augment" if settings.augment_feedback_only else None,
    )
    return outcome.version


def score_version(version: ModelVersion, data: RetrainData, retained: pd.DataFrame, name: str = "champion") -> Scored:
    """``version`` on the run's held-out feedback and on the retained rows, as the gate compares models."""
    classifier = Classifier.load(version.model_dir, max_length=version.card.max_length, version=version.version)
    holdout = Metrics.model_validate(version.card.holdout_metrics)
    predicted = predictions(classifier, data.feedback_eval["text"].tolist())
    # Macro-F1 over the labels each set has: every model is judged on the same classes, whichever it can output.
    feedback = score(data.feedback_eval["label"].tolist(), predicted, sorted(set(data.feedback_eval["label"])))
    kept = predictions(classifier, retained["text"].tolist())
    retention = score(retained["label"].tolist(), kept, sorted(set(retained["label"])))
    scores = GateScores(
        unchecked_classes=sorted(set(data.labels) - set(retained["label"])),
        holdout_macro_f1=retention.macro_f1,
        feedback_macro_f1=feedback.macro_f1,
        holdout_class_f1={label: m.f1 for label, m in retention.per_class.items()},
        holdout_class_rows={label: m.support for label, m in retention.per_class.items()},
        holdout_rows=retention.rows,
        retained_truth=retained["label"].tolist(),
        retained_predicted=kept,
    )
    metrics = {
        "version": version.version,
        "holdout": holdout.model_dump(),
        "retained": retention.model_dump(),
        "feedback": feedback.model_dump(),
    }
    return Scored(name, version, scores, metrics, predicted)


def combine(name: str, parts: list[Scored], truth: list[str]) -> Scored:
    """A recipe judged out of fold: ``parts`` are its models, each scored on the fold of feedback it never learned
    (``truth``: those folds' labels, in order). Their predictions together judge it on every held-out label; on the
    retained rows it shows its worst model's figures (the runner checks every model there). It stands for its first
    model (what serves if the recipe is not trained again on every label)."""
    predicted = [label for part in parts for label in part.predicted]
    feedback = score(truth, predicted, sorted(set(truth)))
    worst = min(parts, key=lambda part: part.scores.holdout_macro_f1)
    scores = worst.scores.model_copy(update={"feedback_macro_f1": feedback.macro_f1})
    metrics = {**parts[0].metrics, "retained": worst.metrics["retained"], "feedback": feedback.model_dump()}
    return Scored(name, parts[0].version, scores, metrics, predicted, parts=parts)
