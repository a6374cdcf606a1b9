"""The retrain gate's shadow phase (FLYWHEEL_RETRAIN_SHADOW_MINUTES): a challenger that passes the offline gate is
deployed as a shadow instead of promoted, and the worker later promotes it only when its shadow predictions agree
with the champion and its accuracy on the feedback that arrived holds; otherwise the shadow ends with the reason.

Shadow traffic is written as ingestion stores it: the live prediction rows, and the shadow rows ``shadow_row`` makes
of the events the service publishes, each scored by the real models.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from sqlmodel import col, select

from feedback.prediction_rows import prediction_row, shadow_row
from feedback.store import FeedbackStore
from flywheel.classifier import Classifier
from flywheel.comparison import shadow_comparison
from flywheel.database import Database
from flywheel.deployments import DeploymentStore
from flywheel.events import PredictionEvent, Shadowed, new_id, utcnow
from flywheel.models.deployment import Deployment, DeploymentMode, DeploymentOutcome, ShadowPrediction
from flywheel.models.feedback import FeedbackCreate
from flywheel.models.retrain import RunStatus, RunTrigger
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.runner import RetrainRunner
from retrain.shadow_phase import ShadowPhase, verdict
from tests.flywheel.model_files import register_copy
from tests.retrain.conftest import label, trust
from tests.service.challengers import register_swapped
from tests.support import product_reviews, synthetic_sentiment

MINUTES = 10


@pytest.fixture()
def settings(home_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("FLYWHEEL_RETRAIN_SHADOW_MINUTES", str(MINUTES))
    monkeypatch.setenv("FLYWHEEL_RETRAIN_SHADOW_SAMPLE", "0.5")
    monkeypatch.setenv("FLYWHEEL_RETRAIN_SHADOW_MIN_PREDICTIONS", "40")
    return Settings()


def classifier(registry: ModelRegistry, version: str) -> Classifier:
    entry = registry.get(version)
    return Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=version)


def shadow_traffic(store: FeedbackStore, registry: ModelRegistry, rows: int, seed: int) -> list[tuple[str, str]]:
    """``rows`` requests answered by the champion and shadowed by the active shadow, stored as ingestion stores
    them; each request's id with its text's true label."""
    deployment = DeploymentStore(store.database).active()
    assert deployment is not None and deployment.mode == DeploymentMode.SHADOW
    frame = synthetic_sentiment(rows, seed=seed)
    texts = frame["text"].tolist()
    served, shadow = classifier(registry, str(registry.champion())), classifier(registry, deployment.version)
    now = utcnow()
    live, shadows = [], []
    for text, ours, theirs in zip(
        texts, served.predict_proba(texts).probs, shadow.predict_proba(texts).probs, strict=True
    ):
        answer = {name: float(p) for name, p in zip(served.labels, ours, strict=True)}
        label = max(answer, key=lambda name: answer[name])
        guess = {name: float(p) for name, p in zip(shadow.labels, theirs, strict=True)}
        event = PredictionEvent(
            prediction_id=new_id(),
            model_version=served.version,
            text=text,
            label=label,
            confidence=answer[label],
            scores=answer,
            latency_ms=3.0,
        )
        live.append(prediction_row(event, now))
        shadows.append(
            shadow_row(
                PredictionEvent(
                    prediction_id=event.prediction_id,
                    model_version=shadow.version,
                    label=max(guess, key=lambda n: guess[n]),
                    confidence=max(guess.values()),
                    scores=guess,
                    latency_ms=6.0,
                    shadow=Shadowed(
                        deployment_id=deployment.deployment_id,
                        served_version=served.version,
                        served_label=label,
                        served_confidence=answer[label],
                    ),
                ),
                now,
            )
        )
    store.ingest(live)
    with store.database.session() as session:
        session.add_all(ShadowPrediction(**row) for row in shadows)
    return [(row["prediction_id"], truth) for row, truth in zip(live, frame["label"], strict=True)]


def feedback_on(store: FeedbackStore, requests: list[tuple[str, str]]) -> None:
    """A trusted annotator labels these requests with their true labels."""
    for prediction_id, truth in requests:
        store.submit(FeedbackCreate(prediction_id=prediction_id, label=truth), principal="annotation")


def due(database: Database) -> datetime:
    deployment = DeploymentStore(database).active()
    assert deployment is not None
    return deployment.started_at + timedelta(minutes=MINUTES, seconds=1)


@pytest.mark.slow
def test_a_challenger_that_passes_the_gate_waits_in_shadow_then_is_promoted(
    settings: Settings, database: Database, store: FeedbackStore
) -> None:
    registry = ModelRegistry(settings)
    runner = RetrainRunner(settings, database, registry, progress=False)
    champion = registry.champion()
    trust(store)
    label(store, product_reviews(160, seed=1))

    run = runner.run(RunTrigger.MANUAL)

    assert run is not None and run.status == RunStatus.SHADOW, run
    assert registry.champion() == champion and "in its shadow phase until" in (run.reason or "")
    deployment = DeploymentStore(database).active()
    assert deployment is not None and (deployment.version, deployment.run_id) == (run.challenger_version, run.run_id)
    assert (deployment.mode, deployment.share, deployment.started_by) == ("shadow", 0.5, "retrain-worker")
    assert not [f for f in store.export() if f.status == "used"], "labels marked used before any promotion"
    phase = ShadowPhase(settings, database, registry)
    assert phase.pending()

    requests = shadow_traffic(store, registry, 60, seed=3)
    feedback_on(store, requests[:20])
    assert phase.settle(now=utcnow()) == [], "decided before its time was up"

    settled = phase.settle(now=due(database))

    assert [r.run_id for r in settled] == [run.run_id] and settled[0].status == RunStatus.PROMOTED, settled
    assert (settled[0].reason or "").startswith("shadow phase: agreement with the served label")
    assert "; gate: better on fresh feedback" in (settled[0].reason or "")
    assert registry.champion() == run.challenger_version
    ended = DeploymentStore(database).history(1)[0]
    assert (ended.outcome, ended.ended_by) == (DeploymentOutcome.PROMOTED, "retrain-worker")
    assert ended.evidence and ended.evidence["rows"] == 60 and ended.evidence["feedback"]["labelled"] == 20
    used = [f for f in store.export() if f.status == "used"]
    assert len(used) == run.feedback_train_rows and {f.used_by_version for f in used} == {run.challenger_version}
    assert not phase.pending()


def begin(runner: RetrainRunner, settings: Settings, version: str, feedback_ids: list[str]) -> str:
    """A run whose challenger passed the gate, put in its shadow phase as the runner does; its id."""
    run = runner.request(RunTrigger.MANUAL)
    assert runner.lock.acquire()
    try:
        phase = ShadowPhase(settings, runner.database, runner.registry, runner.lock)
        status = phase.begin(
            run.run_id,
            challenger=version,
            expected=str(runner.registry.champion()),
            feedback_ids=feedback_ids,
            reason="better on fresh feedback (the gate)",
            started=time.monotonic(),
        )
    finally:
        runner.lock.release()
    assert status == RunStatus.SHADOW
    return run.run_id


@pytest.mark.parametrize("case", ["disagrees", "quiet", "stopped"])
def test_the_shadow_phase_refuses_a_challenger_live_traffic_does_not_bear_out(
    case: str, settings: Settings, database: Database, store: FeedbackStore
) -> None:
    registry = ModelRegistry(settings)
    runner = RetrainRunner(settings, database, registry, progress=False)
    champion = registry.champion()
    trust(store)
    label(store, product_reviews(20, seed=5))
    learned = [f.feedback_id for f in store.export()]
    version = register_swapped(registry) if case == "disagrees" else register_copy(registry)
    run_id = begin(runner, settings, version, learned)
    requests = shadow_traffic(store, registry, 10 if case == "quiet" else 50, seed=7)
    feedback_on(store, requests[:20])
    when = due(database)
    if case == "stopped":
        DeploymentStore(database, registry).end(
            version, DeploymentMode.SHADOW, DeploymentOutcome.STOPPED, actor="alice", reason="looks odd"
        )

    settled = ShadowPhase(settings, database, registry).settle(now=when)

    assert [r.run_id for r in settled] == [run_id] and settled[0].status == RunStatus.REJECTED
    reason = settled[0].reason or ""
    expected = {
        "disagrees": "agreement with the served label 0.0% over 50 shadow predictions, below "
        "FLYWHEEL_RETRAIN_SHADOW_MIN_AGREEMENT (80%)",
        "quiet": "only 10 shadow predictions, FLYWHEEL_RETRAIN_SHADOW_MIN_PREDICTIONS needs 40",
        "stopped": "its shadow ended before the shadow phase decided (stopped by alice: looks odd)",
    }[case]
    assert expected in reason, reason
    assert registry.champion() == champion
    with database.read_session() as session:
        ended = session.exec(select(Deployment).where(col(Deployment.run_id) == run_id)).one()
    assert ended.outcome == (DeploymentOutcome.STOPPED if case == "stopped" else DeploymentOutcome.REFUSED)
    # The labels its challenger learned from stay for the next retrain.
    assert {f.status for f in store.export() if f.feedback_id in learned} == {"accepted"}
    if case == "disagrees":
        # Had agreement been enough, its accuracy on the labelled requests (the served model's, inverted) would not.
        figures = shadow_comparison(database, version)
        relaxed = verdict(figures, settings.model_copy(update={"retrain_shadow_min_agreement": 0.0}))
        assert not relaxed.promote and "FLYWHEEL_RETRAIN_SHADOW_MAX_ACCURACY_DROP" in relaxed.reason
        assert figures.feedback.challenger_correct == figures.feedback.labelled - figures.feedback.served_correct
