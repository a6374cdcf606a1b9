"""End-to-end fine-tuning with the tiny BERT: registry, golden holdout, champion pointer, model behaviour."""

from __future__ import annotations

import pandas as pd
import pytest

from flywheel.classifier import Classifier
from flywheel.errors import DatasetError, RegistryError
from flywheel.holdout import GoldenHoldout
from flywheel.network import is_sentence_classifier
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.pipeline import TrainingPipeline
from retrain.trainer import Schedule, Trainer
from tests.support import NEGATIVE_WORDS, POSITIVE_WORDS, synthetic_sentiment

pytestmark = pytest.mark.slow


@pytest.fixture()
def pipeline(settings: Settings) -> TrainingPipeline:
    return TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False))


def test_first_model_becomes_champion_with_sane_metrics(pipeline: TrainingPipeline, settings: Settings) -> None:
    outcome = pipeline.run(synthetic_sentiment(400))
    registry = pipeline.registry
    assert registry.champion() == outcome.version.version
    assert outcome.promoted
    card = registry.get(outcome.version.version).card
    assert card.labels == ["negative", "positive"]
    assert card.holdout_metrics["macro_f1"] >= 0.8, card.holdout_metrics
    assert set(card.holdout_metrics["per_class"]) == {"negative", "positive"}
    assert card.quality_report["rows_in"] == 400
    assert (outcome.version.path / "metrics.json").is_file()
    assert pd.read_parquet(outcome.version.training_data_path).shape[0] == card.train_rows
    assert GoldenHoldout(settings.home / "holdout").info().sha256 == card.holdout_sha256
    assert settings.bentoml_home in outcome.version.path.parents


def test_promote_and_rollback_move_the_pointer(pipeline: TrainingPipeline) -> None:
    first = pipeline.run(synthetic_sentiment(400)).version.version
    second = pipeline.run(synthetic_sentiment(400, seed=1), promote=True).version.version
    registry = pipeline.registry
    assert registry.champion() == second
    assert registry.get(second).card.holdout_sha256 == registry.get(first).card.holdout_sha256
    change = registry.rollback()
    assert (change.previous, change.version) == (second, first)
    assert registry.champion() == first
    assert [h.action for h in registry.pointer().history] == ["promote", "promote", "rollback"]
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()


def test_second_training_without_promote_keeps_the_champion(pipeline: TrainingPipeline) -> None:
    first = pipeline.run(synthetic_sentiment(400)).version.version
    second = pipeline.run(synthetic_sentiment(400, seed=2), warm_start=first)
    assert not second.promoted
    assert pipeline.registry.champion() == first
    assert second.version.card.parent_version == first


def test_holdout_rows_are_never_trained_on(pipeline: TrainingPipeline, settings: Settings) -> None:
    data = synthetic_sentiment(400)
    pipeline.run(data)
    holdout = GoldenHoldout(settings.home / "holdout").load()
    second = pipeline.run(data)
    trained = set(pd.read_parquet(second.version.training_data_path)["text"])
    assert trained.isdisjoint(set(holdout["text"]))


def test_unknown_registry_version_is_a_clear_error(pipeline: TrainingPipeline) -> None:
    pipeline.run(synthetic_sentiment(400))
    with pytest.raises(RegistryError, match="not found"):
        pipeline.registry.get("doesnotexist")


def test_labels_outside_the_holdout_are_dropped_and_reported(pipeline: TrainingPipeline) -> None:
    pipeline.run(synthetic_sentiment(400))
    extra = pd.concat([synthetic_sentiment(400, seed=3), pd.DataFrame({"text": ["meh"] * 3, "label": ["neutral"] * 3})])
    outcome = pipeline.run(extra)
    assert outcome.quality.dropped["unknown_label"].count == 3


def test_too_small_dataset_is_a_clear_error(pipeline: TrainingPipeline) -> None:
    with pytest.raises(DatasetError, match="too few rows"):
        pipeline.run(pd.DataFrame({"text": ["good", "bad", "fine"], "label": ["p", "n", "p"]}))


class TestBehaviour:
    """Behavioural checks beside the metrics: invariance to irrelevant edits, direction of sentiment words."""

    @pytest.fixture()
    def model(self, pipeline: TrainingPipeline, settings: Settings) -> Classifier:
        entry = pipeline.run(synthetic_sentiment(400)).version
        return Classifier.load(entry.model_dir, max_length=settings.max_length, version=entry.version)

    def predict(self, model: Classifier, texts: list[str]) -> list[str]:
        probs = model.predict_proba(texts).probs
        return [model.labels[i] for i in probs.argmax(axis=1)]

    def test_invariant_to_case_spacing_and_filler(self, model: Classifier) -> None:
        base = ["the film was excellent", "the plot was terrible"]
        variants = ["THE FILM WAS EXCELLENT", "the  plot   was terrible", "the cast and the film was excellent"]
        assert self.predict(model, base) == ["positive", "negative"]
        assert self.predict(model, variants) == ["positive", "negative", "positive"]

    def test_swapping_the_sentiment_word_flips_the_label(self, model: Classifier) -> None:
        template = "the story was really {} and the acting too"
        positives = self.predict(model, [template.format(w) for w in POSITIVE_WORDS])
        negatives = self.predict(model, [template.format(w) for w in NEGATIVE_WORDS])
        assert positives.count("positive") >= len(POSITIVE_WORDS) - 1
        assert negatives.count("negative") >= len(NEGATIVE_WORDS) - 1

    def test_long_texts_are_truncated_and_flagged(self, model: Classifier) -> None:
        result = model.predict_proba(["great " * 500, "great"])
        assert result.truncated == [True, False]
        assert result.probs.shape == (2, 2)


def test_small_sets_train_by_steps_and_large_ones_by_epochs(settings: Settings) -> None:
    steps = settings.model_copy(update={"min_train_steps": 300, "epochs": 3, "max_epochs": 40, "batch_size": 32})
    small, large = Schedule.plan(160, steps), Schedule.plan(9000, steps)
    assert (small.steps_per_epoch, small.epochs, small.total_steps) == (5, 40, 200)  # capped by max_epochs
    assert (Schedule.plan(640, steps).epochs, Schedule.plan(640, steps).total_steps) == (15, 300)
    assert (large.epochs, large.total_steps) == (3, 846)
    assert large.eval_every == 85 and small.eval_every == 20  # ten validation checks per run


def test_a_new_head_starts_as_a_linear_probe_and_training_keeps_its_best_check(
    pipeline: TrainingPipeline, settings: Settings
) -> None:
    outcome = pipeline.run(synthetic_sentiment(400))
    training, card = outcome.training, outcome.version.card
    # The probe is checked before the first step; fine-tuning only ever keeps a checkpoint at least as good.
    assert training.history[0]["step"] == 0 and training.probe_macro_f1 == training.history[0]["val_macro_f1"]
    assert training.probe_macro_f1 is not None and training.probe_macro_f1 > 0.6  # frozen random features still tell
    assert training.validation.macro_f1 == max(check["val_macro_f1"] for check in training.history)
    assert card.steps_run == training.steps_run > 0 and card.probe_macro_f1 == training.probe_macro_f1
    assert card.hyperparameters["linear_probe"] is True
    # Stored as encoder + mean-pooled head; a warm start keeps the head and is not probed again.
    assert is_sentence_classifier(outcome.version.model_dir)
    warm = pipeline.run(synthetic_sentiment(400, seed=3), warm_start=outcome.version.version)
    assert warm.training.probe_macro_f1 is None

    unprobed = settings.model_copy(update={"linear_probe": False})
    plain = TrainingPipeline(unprobed, pipeline.registry, Trainer(unprobed, progress=False))
    assert plain.run(synthetic_sentiment(400, seed=4)).training.probe_macro_f1 is None



def test_a_warm_start_keeps_a_blend_with_its_starting_weights_only_when_it_validates_better(
    pipeline: TrainingPipeline,
) -> None:
    first = pipeline.run(synthetic_sentiment(400))
    # A new head has no trained start worth blending with.
    assert first.training.weight_interpolation == 1.0 and not [h for h in first.training.history if "alpha" in h]

    warm = pipeline.run(synthetic_sentiment(400, seed=3), warm_start=first.version.version)

    training = warm.training
    blends = [h for h in training.history if "alpha" in h]
    # The first check is the starting weights (the champion's): only trained checkpoints compete, then the blends.
    tuned = max(h["val_macro_f1"] for h in training.history[1:] if "alpha" not in h)
    assert [h["alpha"] for h in blends] == [0.5, 0.75]
    kept = {1.0: tuned, **{h["alpha"]: h["val_macro_f1"] for h in blends}}
    assert training.validation.macro_f1 == max(kept.values()) == kept[training.weight_interpolation]
    assert warm.version.card.weight_interpolation == training.weight_interpolation
    assert warm.version.card.hyperparameters["weight_interpolation"] == [0.5, 0.75]


def test_a_warm_start_learns_even_when_no_trained_check_beats_its_start(settings: Settings) -> None:
    first = TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False)).run(
        synthetic_sentiment(400)
    )
    champion = Classifier.load(first.version.model_dir, max_length=first.version.card.max_length)
    data = synthetic_sentiment(300, seed=5)
    guessed = champion.predict_proba(data["text"].tolist()).probs.argmax(axis=1)
    right = data[[champion.labels[i] == label for i, label in zip(guessed, data["label"], strict=True)]]
    # Validation rows the champion gets all right: no trained check can beat the first one (the champion itself).
    validation, train = right.iloc[:60], data.drop(index=right.index[:60])
    assert validation["label"].nunique() == 2
    strict = settings.model_copy(update={"patience": 0, "evaluations": 20, "weight_interpolation": []})

    result = Trainer(strict, progress=False).train(
        train, validation, first.version.card.labels, str(first.version.model_dir)
    )

    # Keeping the first check would return the champion unchanged, a candidate that learned nothing.
    assert result.history[0]["val_macro_f1"] == 1.0 and result.steps_run > 0
    texts = data["text"].tolist()[:20]
    tuned = result.classifier(first.version.card.max_length).predict_proba(texts).probs
    assert not (champion.predict_proba(texts).probs == tuned).all()


def test_blending_takes_shares_of_the_fine_tuned_weights_between_zero_and_one() -> None:
    assert Settings(weight_interpolation="0.25, 0.5").weight_interpolation == [0.25, 0.5]
    assert Settings(weight_interpolation="").weight_interpolation == []
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        Settings(weight_interpolation=[1.0])
