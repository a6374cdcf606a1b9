"""From a labeled frame to a registered, evaluated model: clean, split, fine-tune, evaluate, save."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flywheel.errors import DatasetError
from flywheel.holdout import GoldenHoldout, HoldoutInfo, content_hash, stratified_split
from flywheel.quantization import CALIBRATION_TEXTS
from flywheel.registry import TRAINING_DATA_FILE, ModelCard, ModelRegistry, ModelVersion
from flywheel.runtime import build as build_runtime
from flywheel.runtime import evaluation_texts
from flywheel.settings import Settings
from flywheel.text import dedupe_key
from retrain.augmentation import Augmenter
from retrain.evaluation import Metrics, evaluate
from retrain.quality import QualityPipeline, QualityReport
from retrain.trainer import Trainer, TrainingResult

logger = logging.getLogger(__name__)

#: The rows a version's checkpoint was chosen on, kept beside its training data: a retrain measures what the
#: challenger forgets on them, rows the champion never trained on (its own training rows it knows by heart).
VALIDATION_DATA_FILE = "validation_data.parquet"
#: The rows augmentation added to a version's training rows, each with its operation and source text: what the
#: model also trained on, for people to check.
AUGMENTED_DATA_FILE = "augmented_data.parquet"


def validation_data(version: ModelVersion) -> pd.DataFrame | None:
    """The validation rows ``version`` was trained with; None for versions saved before they were kept."""
    path = version.path / VALIDATION_DATA_FILE
    return pd.read_parquet(path) if path.exists() else None


@dataclass
class TrainingOutcome:
    """A registered model with its reports and whether it now serves."""

    version: ModelVersion
    quality: QualityReport
    holdout: HoldoutInfo
    holdout_metrics: Metrics
    training: TrainingResult
    promoted: bool


class TrainingPipeline:
    """Runs the whole training recipe against the registry and the golden holdout."""

    def __init__(self, settings: Settings, registry: ModelRegistry, trainer: Trainer | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.trainer = trainer or Trainer(settings)
        self.holdout = GoldenHoldout(settings.home / "holdout")

    def prepare(
        self, raw: pd.DataFrame, added_labels: Sequence[str] = ()
    ) -> tuple[pd.DataFrame, QualityReport, pd.DataFrame, HoldoutInfo]:
        """Clean ``raw``; freeze the holdout on first use, else remove holdout texts from the data.

        Once a holdout exists, rows must carry one of its labels or of ``added_labels``.
        """
        allowed = [*self.holdout.info().labels, *added_labels] if self.holdout.exists() else None
        cleaned, report = QualityPipeline(self.settings.max_text_chars, allowed_labels=allowed).run(raw)
        if self.holdout.exists():
            holdout = self.holdout.load()
            # Rows of the frozen holdout must never be trained on, or its scores stop meaning anything.
            held = set(holdout["text"].map(dedupe_key))
            cleaned = cleaned[~cleaned["text"].map(dedupe_key).isin(held)].reset_index(drop=True)
            if cleaned.empty:
                raise DatasetError("every cleaned row is part of the golden holdout; nothing is left to train on")
            return cleaned, report, holdout, self.holdout.info()
        rest, holdout = stratified_split(cleaned, self.settings.holdout_fraction, self.settings.seed, "holdout")
        info = self.holdout.freeze(holdout)
        return rest, report, holdout, info

    def run(
        self,
        raw: pd.DataFrame,
        *,
        base: str | None = None,
        warm_start: str | None = None,
        promote: bool = False,
        sample_weight_column: str | None = None,
        probe: bool | None = None,
        group_column: str | None = None,
        validation: pd.DataFrame | None = None,
        added_labels: Sequence[str] = (),
        augment_column: str | None = None,
    ) -> TrainingOutcome:
        """Train a new version from ``raw``; warm-start from a registry version when given.

        ``probe`` refits a warm start's head by linear probing (None: only a new head is probed); checkpoints are
        judged by the mean macro-F1 of the validation rows' ``group_column`` groups when it is given. ``validation``
        fixes the validation rows (cleaned rows, never trained on); without it a stratified share of ``raw`` is split
        off. ``added_labels`` (``flywheel labels add``) that have rows join the holdout's labels: the head grows.
        With ``settings.augment`` the training rows (only those true in the boolean ``augment_column`` when it is
        given) are augmented once the validation rows and the holdout are split off, never those.
        """
        data, report, holdout, info = self.prepare(raw, added_labels)
        # A label grows the head only once there are rows to learn it from.
        labels = sorted(set(info.labels) | (set(added_labels) & set(data["label"])))
        missing = sorted(set(labels) - set(data["label"]))
        if missing:
            raise DatasetError(f"training data has no rows for labels {missing} that the golden holdout has")
        if validation is None:
            train, validation = stratified_split(
                data, self.settings.validation_fraction, self.settings.seed, "validation"
            )
        else:
            # Neither the holdout nor the training rows may be validated on, or the checkpoint choice learns them.
            validation = validation[~validation["text"].map(dedupe_key).isin(set(holdout["text"].map(dedupe_key)))]
            validation = validation[validation["label"].isin(labels)].reset_index(drop=True)
            keys = set(validation["text"].map(dedupe_key))
            train = data[~data["text"].map(dedupe_key).isin(keys)].reset_index(drop=True)
            if validation.empty:
                raise DatasetError("no validation rows are left once the golden holdout's texts are removed")
        if warm_start:
            init_from = self.registry.get(warm_start).model_dir.as_posix()
        else:
            init_from = base or self.settings.base_model
        logger.info("training on %d rows, validating on %d, from %s", len(train), len(validation), init_from)
        trained = train
        augmenter = Augmenter.from_settings(self.settings)
        if augmenter is not None:
            eligible = train[augment_column] if augment_column else None
            trained, report.augmentation = augmenter.apply(
                train, exclude=[*validation["text"], *holdout["text"]], eligible=eligible
            )
        weights = trained[sample_weight_column] if sample_weight_column else None
        groups = validation[group_column] if group_column else None
        result = self.trainer.train(
            trained, validation, labels, init_from, sample_weight=weights, probe=probe, validation_groups=groups
        )
        holdout_metrics = evaluate(result.classifier(self.settings.max_length), holdout)
        card = ModelCard(
            labels=labels,
            base_model=base or self.settings.base_model,
            parent_version=warm_start,
            max_length=self.settings.max_length,
            data_sha256=content_hash(data),
            holdout_sha256=info.sha256,
            train_rows=len(train),
            validation_rows=len(validation),
            holdout_metrics=holdout_metrics.model_dump(),
            validation_metrics=result.validation.model_dump(),
            quality_report=report.model_dump(),
            hyperparameters=self.trainer.hyperparameters(),
            training_seconds=result.seconds,
            epochs_run=result.epochs_run,
            steps_run=result.steps_run,
            probe_macro_f1=result.probe_macro_f1,
            weight_interpolation=result.weight_interpolation,
            stopped_because=result.stopped_because,
        )

        def write(path: Path) -> None:
            result.save(path / "model")
            s = self.settings
            checked = evaluation_texts([holdout, validation], train, s.runtime_eval_texts, s.seed)
            calibration = train["text"].sample(n=min(CALIBRATION_TEXTS, len(train)), random_state=s.seed).tolist()
            choice = build_runtime(
                result.classifier(s.max_length),
                path / "model",
                checked["text"].tolist(),
                checked["label"].tolist(),
                s,
                calibration=calibration,
            )
            card.runtime, card.runtime_evidence = choice.runtime, choice.model_dump()
            # The rows as given, not the augmented ones: a retrain replays them (and augments its own set), and
            # drift compares traffic with them.
            train[["text", "label"]].to_parquet(path / TRAINING_DATA_FILE, index=False)
            if augmenter is not None:
                added = trained[trained["augmentation"].notna()]
                added[["text", "label", "augmentation", "augmented_from"]].to_parquet(
                    path / AUGMENTED_DATA_FILE, index=False
                )
            validation[["text", "label"]].to_parquet(path / VALIDATION_DATA_FILE, index=False)
            (path / "metrics.json").write_text(holdout_metrics.model_dump_json(indent=2))
            (path / "quality_report.json").write_text(report.model_dump_json(indent=2))

        version = self.registry.save(card, write)
        first = self.registry.champion() is None
        if first or promote:
            self.registry.promote(version.version, reason="first model" if first else "trained with --promote")
        return TrainingOutcome(
            version=version,
            quality=report,
            holdout=info,
            holdout_metrics=holdout_metrics,
            training=result,
            promoted=first or promote,
        )
