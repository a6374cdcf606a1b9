"""Canary challengers: a share of callers is answered by another version, chosen by a hash of the caller's client id
(else its principal), so one caller always sees one model; the worker withdraws a canary worse than the champion on
feedback, and `flywheel models promote` finishes a good one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.access import AuditLog, KeyStore
from flywheel.broker import EmbeddedBroker
from flywheel.comparison import canary_comparison, shadow_comparison
from flywheel.database import Database
from flywheel.deployments import DeploymentStore, canary_bucket
from flywheel.events import PredictionEvent, new_id, utcnow
from flywheel.models.access import Role
from flywheel.models.deployment import (
    Deployment,
    DeploymentCreate,
    DeploymentMode,
    DeploymentOutcome,
    ShadowPrediction,
)
from flywheel.models.feedback import FeedbackCreate
from flywheel.registry import ModelRegistry
from stack.worker import RetrainWorker
from tests.conftest import copy_home, run_cli, settings_from, wait_until
from tests.flywheel.model_files import register_copy
from tests.service.challengers import Stack, challenger_stack, register_swapped
from tests.support import synthetic_sentiment

#: Trusted labels per side before a canary is judged (the default, 30, would need far more traffic).
MIN_LABELLED = 12


@pytest.fixture(scope="module")
def stack(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("canary")
    env = {"FLYWHEEL_CANARY_MIN_LABELLED": str(MIN_LABELLED), "FLYWHEEL_CANARY_MAX_ACCURACY_DROP": "0.2"}
    with challenger_stack(trained_home, broker, directory, **env) as running:
        running.store.set_source("anonymous", trusted=True)
        yield running


def deploy(stack: Stack, version: str, share: float) -> None:
    result = run_cli(stack.env, "models", "canary", version, "--share", str(share))
    assert result.returncode == 0, result.stderr
    assert f"canary {version} answers {share:.0%} of callers" in result.stdout


def caller_of(version: str, share: float, canary: bool, start: int = 0) -> str:
    """A client id the canary of ``version`` at ``share`` answers (or does not)."""
    return next(
        f"client-{i}" for i in range(start, start + 10_000) if (canary_bucket(f"client-{i}", version) < share) is canary
    )


def answering(stack: Stack, version: str, share: float) -> None:
    """Wait until the worker routes to the canary (it follows the deployment table within a poll)."""
    client = caller_of(version, share, canary=True)
    wait_until(lambda: stack.predict(["a fine film"], client)[0]["model_version"] == version, what="canary routing")


def label_traffic(stack: Stack, rows: int, seed: int, version: str, share: float) -> tuple[int, int]:
    """Requests from callers on both sides, every answer labelled with its text's true label; how many each side
    answered."""
    frame = synthetic_sentiment(rows, seed=seed)
    answers = [
        stack.predict([text], caller_of(version, share, canary=i % 2 == 0, start=i * 50))[0]
        for i, text in enumerate(frame["text"])
    ]
    stack.wait_stored([str(answer["prediction_id"]) for answer in answers])
    for answer, truth in zip(answers, frame["label"], strict=True):
        response = stack.client.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": truth})
        assert response.status_code == 202, response.text
    canary = sum(answer["model_version"] == version for answer in answers)
    return canary, len(answers) - canary


def test_routing_takes_the_share_by_client_id_and_each_caller_keeps_its_model(stack: Stack) -> None:
    champion = str(stack.registry.champion())
    version = register_swapped(stack.registry)
    deploy(stack, version, 0.3)
    answering(stack, version, 0.3)

    clients = [f"caller-{i}" for i in range(300)]
    answered = {client: stack.predict(["the plot was quite good"], client)[0]["model_version"] for client in clients}

    expected = {client: version if canary_bucket(client, version) < 0.3 else champion for client in clients}
    assert answered == expected
    share = sum(v == version for v in answered.values()) / len(clients)
    assert 0.22 <= share <= 0.38, share
    for client in clients[:20]:
        again = {str(p["model_version"]) for p in stack.predict(["a dull story", "a lovely cast"], client)}
        assert again == {answered[client]}
    # Without a client id the principal decides: here the anonymous caller, every time the same.
    anonymous = version if canary_bucket("anonymous", version) < 0.3 else champion
    assert {str(p["model_version"]) for p in stack.predict(["a film", "a movie", "a story"])} == {anonymous}


def test_the_worker_withdraws_a_confident_but_wrong_canary(stack: Stack) -> None:
    champion = str(stack.registry.champion())
    version = register_swapped(stack.registry)
    deploy(stack, version, 0.5)
    answering(stack, version, 0.5)
    store = DeploymentStore(stack.database)
    settings = settings_from(stack.env)

    canary, _ = label_traffic(stack, 10, seed=21, version=version, share=0.5)
    early = store.review_canary(settings)
    assert early is not None and early.canary.labelled == canary < MIN_LABELLED
    assert store.active() is not None, "judged before it had the labels to be judged on"

    label_traffic(stack, 30, seed=22, version=version, share=0.5)
    worker = RetrainWorker(
        settings.model_copy(update={"challenger_check_seconds": 0.5, "retrain_queue_poll_seconds": 3600})
    )
    worker.start()
    try:
        wait_until(lambda: store.active() is None, timeout=30, what="the worker to withdraw the canary")
    finally:
        worker.shutdown()

    ended = store.history(1)[0]
    assert (ended.version, ended.outcome, ended.ended_by) == (version, DeploymentOutcome.WITHDRAWN, "canary-watch")
    assert "below the champion's" in (ended.reason or "")
    evidence = ended.evidence or {}
    assert evidence["canary"]["labelled"] >= MIN_LABELLED and evidence["canary"]["accuracy"] < 0.5
    assert evidence["champion"]["accuracy"] > 0.5
    assert any(e.action == "model.canary.withdrawn" and e.target == version for e in AuditLog(stack.database).recent())
    # Every caller is back on the champion, the canary's included.
    time.sleep(1.5)
    client = caller_of(version, 0.5, canary=True)
    assert stack.predict(["a great film"], client)[0]["model_version"] == champion
    compared = run_cli(stack.env, "models", "compare", version)
    assert compared.returncode == 0 and "withdrawn" in compared.stdout and "on trusted feedback" in compared.stdout


def test_a_good_canary_is_kept_and_promote_finishes_it(stack: Stack) -> None:
    version = register_copy(stack.registry)
    deploy(stack, version, 0.5)
    answering(stack, version, 0.5)
    store = DeploymentStore(stack.database)
    label_traffic(stack, 30, seed=23, version=version, share=0.5)

    figures = store.review_canary(settings_from(stack.env))
    assert figures is not None and figures.canary.labelled >= MIN_LABELLED
    assert figures.canary.accuracy == pytest.approx(figures.champion.accuracy, abs=0.25)
    assert store.active() is not None and store.active().version == version  # type: ignore[union-attr]

    promoted = run_cli(stack.env, "models", "promote", version)
    assert promoted.returncode == 0, promoted.stderr
    assert f"the canary of {version} ended: promoted" in promoted.stdout
    ended = store.history(1)[0]
    assert (ended.outcome, ended.ended_by) == (DeploymentOutcome.PROMOTED, "cli")
    assert stack.registry.champion() == version
    other = caller_of(version, 0.5, canary=False)
    wait_until(lambda: stack.predict(["a great film"], other)[0]["model_version"] == version, what="hot reload")


def test_callers_without_a_client_id_are_routed_by_principal(stack: Stack) -> None:
    champion = str(stack.registry.champion())
    version = register_swapped(stack.registry)
    keys = {
        name: KeyStore(stack.database).create(name, Role.CLIENT, "test")[1] for name in (f"team-{i}" for i in range(40))
    }
    deploy(stack, version, 0.5)
    first = next(iter(keys.values()))
    wait_until(lambda: stack.client.get("/model", headers={"X-API-Key": first}).status_code == 200, what="keys")
    answering_key = next(key for name, key in keys.items() if canary_bucket(name, version) < 0.5)

    def answered_by(key: str) -> str:
        response = stack.client.post("/predict", json={"text": "a fine film"}, headers={"X-API-Key": key})
        assert response.status_code == 200, response.text
        return str(response.json()["model_version"])

    wait_until(lambda: answered_by(answering_key) == version, what="canary routing")
    for name, key in keys.items():
        assert answered_by(key) == (version if canary_bucket(name, version) < 0.5 else champion), name


def test_one_challenger_at_a_time_and_its_figures_on_both_databases(
    database_url: str, trained_home: dict[str, str], tmp_path: Path
) -> None:
    settings = settings_from({**copy_home(trained_home, tmp_path / "home"), "FLYWHEEL_DATABASE_URL": database_url})
    registry = ModelRegistry(settings)
    champion, canary = str(registry.champion()), register_copy(registry)
    database = Database(database_url).upgrade()
    try:
        store = DeploymentStore(database, registry)
        shadow = store.start(DeploymentCreate(version=canary, mode=DeploymentMode.SHADOW, share=0.3), "alice")
        started = store.start(DeploymentCreate(version=canary, mode=DeploymentMode.CANARY, share=0.5), "bob")
        assert [(d.mode, d.outcome) for d in store.history()] == [("canary", None), ("shadow", "replaced")]
        assert store.history()[1].reason == f"replaced by a canary of {canary} at 50%"
        with pytest.raises(IntegrityError), database.session() as session:
            # Two operators at the same moment: the database itself keeps one deployment active.
            session.add(Deployment(version=champion, mode=DeploymentMode.CANARY, share=0.1, started_by="carol"))
        # Ten requests each side, the champion right on all, the canary on half: the figures the worker judges by.
        feedback = FeedbackStore(database, settings)
        feedback.set_source("annotation", trusted=True)
        now = utcnow()
        rows = [
            prediction_row(
                PredictionEvent(
                    prediction_id=new_id(),
                    model_version=version,
                    text=f"text {version} {i}",
                    label="positive",
                    confidence=0.9,
                    scores={"positive": 0.9, "negative": 0.1},
                    latency_ms=1.0,
                ),
                now,
            )
            for version in (champion, canary)
            for i in range(10)
        ]
        feedback.ingest(rows)
        for i, row in enumerate(rows):
            truth = "negative" if row["model_version"] == canary and i % 2 else "positive"
            feedback.submit(FeedbackCreate(prediction_id=row["prediction_id"], label=truth), principal="annotation")
        figures = canary_comparison(database, canary)
        assert figures.deployment.deployment_id == started.deployment_id
        assert (figures.canary.requests, figures.canary.labelled, figures.canary.correct) == (10, 10, 5)
        assert (figures.champion.requests, figures.champion.labelled, figures.champion.correct) == (10, 10, 10)
        assert [(s.label, s.served, s.challenger) for s in figures.labels] == [("positive", 10, 10)]
        withdrawn = store.review_canary(settings.model_copy(update={"canary_min_labelled": 10}))
        assert withdrawn is not None and store.active() is None
        assert "50.0% of 10, is 50.0 points below the champion's 100.0% of 10" in (store.history(1)[0].reason or "")
        # The shadow window's figures are aggregated by the database too.
        with database.session() as session:
            session.add_all(
                ShadowPrediction(
                    prediction_id=row["prediction_id"],
                    deployment_id=shadow.deployment_id,
                    model_version=canary,
                    label="negative" if i < 3 else "positive",
                    confidence=0.7,
                    scores={"positive": 0.3, "negative": 0.7},
                    served_version=champion,
                    served_label="positive",
                    served_confidence=0.9,
                    created_at=now,
                )
                for i, row in enumerate(rows[10:])
            )
        compared = shadow_comparison(database, canary)
        assert (compared.rows, compared.agreed, compared.agreement) == (10, 7, 0.7)
        assert compared.confidence_shift == pytest.approx(-0.2)
        assert (compared.feedback.labelled, compared.feedback.served_correct) == (10, 5)
    finally:
        database.dispose()
