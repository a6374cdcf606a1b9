"""Self-training: the champion's confident predictions on recent traffic join a retrain as low-weight rows, never
on a text a person labeled, one per text, capped per class; off by default."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest

from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.events import PredictionEvent, new_id, utcnow
from flywheel.labels import LabelLedger
from flywheel.models.retrain import RunStatus, RunTrigger
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.dataset import assemble
from retrain.runner import RetrainRunner
from tests.retrain.conftest import label, trust
from tests.support import product_reviews

pytestmark = pytest.mark.slow


def log(store: FeedbackStore, text: str, label: str, confidence: float, days_ago: float = 0.0) -> None:
    """Store a prediction as ingestion does, ``days_ago`` old."""
    other = "negative" if label == "positive" else "positive"
    event = PredictionEvent(
        prediction_id=new_id(),
        model_version="v1",
        text=text,
        label=label,
        confidence=confidence,
        scores={label: confidence, other: round(1 - confidence, 6)},
        latency_ms=1.0,
        emitted_at=utcnow() - timedelta(days=days_ago),
    )
    store.ingest([prediction_row(event, utcnow())])


def test_only_confident_recent_unlabeled_predictions_are_taken_once_each(store: FeedbackStore) -> None:
    log(store, "a sturdy reliable phone", "positive", 0.99)
    log(store, "a sturdy reliable phone", "positive", 0.98)  # the same text again
    log(store, "a flimsy broken case", "negative", 0.97)
    log(store, "an unsure charger", "positive", 0.61)  # not confident
    log(store, "an old leaky battery", "negative", 0.99, days_ago=30)  # too old
    log(store, "a laggy screen", "positive", 0.99)  # a person says otherwise, below
    label(store, pd.DataFrame({"text": ["a laggy screen"], "label": ["negative"]}))

    rows = LabelLedger(store.database).confident_predictions(utcnow() - timedelta(days=7), 0.95)
    assert [(row.text, row.label) for row in rows] == [
        ("a sturdy reliable phone", "positive"),
        ("a flimsy broken case", "negative"),
    ]


def test_pseudo_labels_train_with_a_low_weight_capped_per_class(store: FeedbackStore) -> None:
    settings = Settings(retrain_self_training_max_per_class=2, retrain_self_training_weight=0.25)
    champion = ModelRegistry(settings).champion_version()
    trust(store)
    label(store, product_reviews(40, seed=1))
    for i in range(5):
        log(store, f"pseudo positive {i}", "positive", 0.99 - i / 100)
        log(store, f"pseudo negative {i}", "negative", 0.99 - i / 100)
    ledger = LabelLedger(store.database)
    pseudo = ledger.confident_predictions(utcnow() - timedelta(days=1), 0.9)

    data = assemble(champion, ledger.training_rows(), settings, settings.seed, pseudo_labels=pseudo)
    taken = data.train[data.train["text"].str.startswith("pseudo")]
    assert data.self_training_rows == 4
    assert sorted(taken["text"]) == ["pseudo negative 0", "pseudo negative 1", "pseudo positive 0", "pseudo positive 1"]
    assert set(taken["weight"]) == {0.25} and taken["feedback_id"].isna().all()
    assert not data.feedback_eval["text"].str.startswith("pseudo").any()
    assert data.validation is None or not data.validation["text"].str.startswith("pseudo").any()
    # Off by default.
    assert not Settings().retrain_self_training


def test_a_retrain_with_self_training_records_the_rows_it_added(
    store: FeedbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_RETRAIN_SELF_TRAINING", "true")
    trust(store)
    label(store, product_reviews(160, seed=1))
    for row in product_reviews(40, seed=5).itertuples():
        log(store, row.text, row.label, 0.99)
    settings = Settings()
    runner = RetrainRunner(settings, store.database, ModelRegistry(settings), progress=False)

    run = runner.run(RunTrigger.MANUAL)

    assert run is not None and run.status in {RunStatus.PROMOTED, RunStatus.REJECTED}, run
    assert run.gate_evidence is not None and run.gate_evidence["self_training_rows"] == 40
