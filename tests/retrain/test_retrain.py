"""The retrain loop against a real store and registry: gate, promotion, poisoning resistance, crash safety, locking,
schedule.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.events import AlertEvent
from flywheel.labels import LabelLedger
from flywheel.models.retrain import RunStatus, RunTrigger
from flywheel.publisher import EventPublisher
from flywheel.settings import Settings
from monitoring.schedule import JOB_ID as DRIFT_JOB_ID
from retrain.dataset import assemble
from retrain.lease import RetrainLock
from retrain.runner import RetrainRunner
from stack.worker import RetrainWorker
from tests.conftest import free_port
from tests.conftest import run_cli as run_cli_here
from tests.retrain.conftest import label, trust
from tests.support import product_reviews, synthetic_sentiment

pytestmark = pytest.mark.slow
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def vet(env: dict[str, str]) -> None:
    """Score untrusted labels with the champion, as an operator does with `flywheel feedback vet`."""
    result = run_cli_here(env, "feedback", "vet")
    assert result.returncode == 0, result.stderr


def sources_of(store: FeedbackStore, feedback_ids: list[str]) -> pd.Series:
    """How many of these labels each principal sent."""
    source = {row.feedback_id: row.source for row in store.export()}
    return pd.Series([source[feedback_id] for feedback_id in feedback_ids], dtype=str).value_counts()


def accuracy(version_dir: Path, rows: pd.DataFrame) -> float:
    model = Classifier.load(version_dir, max_length=32)
    predicted = [model.labels[i] for i in model.predict_proba(rows["text"].tolist()).probs.argmax(axis=1)]
    return sum(p == t for p, t in zip(predicted, rows["label"], strict=True)) / len(rows)


def test_corrections_teach_a_new_domain_and_the_gate_promotes(runner: RetrainRunner, store: FeedbackStore) -> None:
    registry = runner.registry
    champion = registry.champion_version()
    unseen = product_reviews(60, seed=99)
    before = accuracy(champion.model_dir, unseen)
    # One trusted annotator teaches the new domain alone: the per-principal cap exempts trusted sources.
    trust(store)
    label(store, product_reviews(160, seed=1))
    assert runner.new_labels() == 160

    run = runner.run(RunTrigger.MANUAL)

    assert run is not None and run.status == RunStatus.PROMOTED, run
    assert registry.champion() == run.challenger_version != champion.version
    assert run.feedback_train_rows + run.feedback_eval_rows == 160
    assert run.challenger_metrics and run.champion_metrics
    assert run.challenger_metrics["feedback"]["macro_f1"] > run.champion_metrics["feedback"]["macro_f1"]
    after = accuracy(registry.champion_version().model_dir, unseen)
    assert after >= 0.8 and after > before + 0.2, (before, after)
    used = [f for f in store.export() if f.status == "used"]
    assert len(used) == run.feedback_train_rows and {f.used_by_version for f in used} == {run.challenger_version}
    assert runner.new_labels() == 0


def test_the_gate_rejects_poisoned_feedback_and_the_champion_keeps_serving(
    runner: RetrainRunner, store: FeedbackStore,
) -> None:
    champion = runner.registry.champion()
    # Texts like the training data, three in four labels flipped at random: following them costs holdout F1,
    # ignoring them gains nothing on the (equally poisoned) feedback slice; either way the gate says no. The
    # poisoner is even trusted here, so its labels judge: the golden holdout still stops it.
    poisoned = synthetic_sentiment(80, seed=7)
    flip = poisoned.sample(frac=0.75, random_state=7).index
    poisoned.loc[flip, "label"] = poisoned.loc[flip, "label"].map({"positive": "negative", "negative": "positive"})
    trust(store)
    label(store, poisoned)

    run = runner.run(RunTrigger.MANUAL)

    assert run is not None and run.status == RunStatus.REJECTED, run
    reason = run.reason or ""
    assert any(why in reason for why in ("golden holdout fell", "no sure gain", "no candidate kept the golden holdout"))
    assert runner.registry.champion() == champion
    # Every challenger stays in the registry for inspection, whichever test it failed.
    assert run.candidates and {c["version"] for c in run.candidates} <= {v.version for v in runner.registry.list()}
    assert not [f for f in store.export() if f.status == "used"]


def test_too_little_feedback_is_skipped_with_a_reason(runner: RetrainRunner, store: FeedbackStore) -> None:
    trust(store)
    label(store, product_reviews(6, seed=3))
    run = runner.run(RunTrigger.SCHEDULE)
    assert run is not None and run.status == RunStatus.SKIPPED
    assert "too few trusted labels to judge a challenger: 2 held out, need 8" in (run.reason or "")


def test_untrusted_labels_alone_never_judge_a_challenger(
    runner: RetrainRunner, store: FeedbackStore, home_env: dict[str, str]
) -> None:
    champion = runner.registry.champion()
    # Enough labels for a retrain, accepted on the champion's evidence, but sent by a principal nobody trusts:
    # were they the exam, a poisoner would grade its own challenger.
    label(store, product_reviews(160, seed=1), source="crowd")
    vet(home_env)
    accepted = len(LabelLedger(runner.database).training_rows())
    assert accepted >= 40, accepted

    run = runner.run(RunTrigger.MANUAL)

    assert run is not None and run.status == RunStatus.SKIPPED, run
    assert run.reason is not None and run.reason.startswith(
        "too few trusted labels to judge a challenger: 0 held out, need 8; trust an annotator"
    ), run.reason
    assert run.challenger_version is None and runner.registry.champion() == champion
    assert not [f for f in store.export() if f.status == "used"]


def test_a_flooding_untrusted_principal_supplies_at_most_its_share(
    runner: RetrainRunner, store: FeedbackStore, home_env: dict[str, str]
) -> None:
    trust(store)
    label(store, product_reviews(60, seed=1))
    label(store, product_reviews(200, seed=5), source="crowd")
    vet(home_env)
    flood = sum(row.source == "crowd" for row in LabelLedger(runner.database).training_rows())
    assert flood >= 40, flood
    settings = runner.settings

    # The set the run below will assemble: same labels, same seed.
    data = assemble(
        runner.registry.champion_version(), LabelLedger(runner.database).training_rows(), settings, settings.seed
    )

    trained = sources_of(store, data.feedback_train_ids)
    # 60 trusted texts, 18 held out to judge: 42 train, and 10 crowd rows are 10/52 < 20% (an 11th: 11/53 > 20%).
    assert settings.retrain_max_principal_share == 0.2
    assert trained.to_dict() == {"annotation": 42, "crowd": 10}
    assert data.capped == {"crowd": flood - 10} and len(data.feedback_eval) == 18

    run = runner.run(RunTrigger.MANUAL)

    assert run is not None and run.status in {RunStatus.PROMOTED, RunStatus.REJECTED}, run
    assert run.feedback_train_rows == 52 and run.feedback_eval_rows == 18
    assert f"the per-principal cap (20%) left out {flood - 10} feedback rows (crowd {flood - 10})" in (run.reason or "")


def test_unvetted_anonymous_labels_do_not_trigger_a_retrain(
    runner: RetrainRunner, store: FeedbackStore, home_env: dict[str, str]
) -> None:
    # Trusted, so they are accepted without any evidence: the worst case for the new-label trigger.
    trust(store, "anonymous")
    label(store, product_reviews(30, seed=2), source="anonymous")
    assert len(LabelLedger(runner.database).training_rows()) == 30
    assert runner.new_labels() == 0

    trust(store)
    label(store, product_reviews(5, seed=3))
    assert runner.new_labels() == 5


def test_only_one_holder_of_the_retrain_lock(database_url: str) -> None:
    database = Database(database_url).upgrade()
    first, second = RetrainLock(database, 60), RetrainLock(database, 60)
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    expired = RetrainLock(database, 0.01)
    second.release()
    assert expired.acquire()
    time.sleep(0.05)
    assert first.acquire(), "an expired lease is free for the taking"
    database.dispose()


def run_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FLYWHEEL, *args], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_retrains_started_together_run_once(
    runner: RetrainRunner, home_env: dict[str, str], store: FeedbackStore,
) -> None:
    trust(store)
    label(store, product_reviews(80, seed=1))
    procs = [run_cli(home_env, "retrain", "now") for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    assert any("another worker is retraining" in err for _, _, err in results)
    assert len(runner.runs()) == 1


def test_a_killed_retrain_leaves_the_champion_and_the_next_run_succeeds(
    runner: RetrainRunner, home_env: dict[str, str], store: FeedbackStore
) -> None:
    champion = runner.registry.champion()
    trust(store)
    label(store, product_reviews(80, seed=1))
    slow = {**home_env, "FLYWHEEL_EPOCHS": "200", "FLYWHEEL_PATIENCE": "200", "FLYWHEEL_RETRAIN_LEASE_SECONDS": "2"}
    proc = run_cli(slow, "retrain", "now")
    deadline = time.monotonic() + 120
    while not runner.runs() or runner.runs()[0].status != RunStatus.RUNNING or not runner.runs()[0].original_rows:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert runner.registry.champion() == champion
    time.sleep(2.5)

    done = run_cli({**home_env, "FLYWHEEL_RETRAIN_LEASE_SECONDS": "2"}, "retrain", "now")
    code, _out, err = done.wait(timeout=300), *done.communicate()
    assert code == 0, err
    latest, killed = runner.runs()[:2]
    assert killed.status == RunStatus.FAILED and "stopped during the run" in (killed.reason or "")
    assert latest.status == RunStatus.PROMOTED
    assert runner.registry.champion() == latest.challenger_version


def test_worker_restart_keeps_its_schedule_and_finished_runs(
    runner: RetrainRunner, home_env: dict[str, str], store: FeedbackStore,
) -> None:
    settings = Settings(retrain_queue_poll_seconds=0.5)
    worker = RetrainWorker(settings)
    worker.start()
    try:
        assert worker.scheduler is not None
        planned = worker.scheduler.get_job("retrain-check").next_run_time
        trust(store)
        label(store, product_reviews(80, seed=1))
        queued = runner.request(RunTrigger.API)
        deadline = time.monotonic() + 120
        while runner.get(queued.run_id).status not in {RunStatus.PROMOTED, RunStatus.REJECTED, RunStatus.FAILED}:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        worker.shutdown()
    time.sleep(1)
    again = RetrainWorker(settings)
    again.start()
    try:
        assert again.scheduler is not None
        assert again.scheduler.get_job("retrain-check").next_run_time == planned
        time.sleep(2)
        assert [r.run_id for r in runner.runs()] == [queued.run_id]
    finally:
        again.shutdown()


def test_a_drift_alert_queues_a_retrain(runner: RetrainRunner, home_env: dict[str, str], tmp_path: Path) -> None:
    with EmbeddedBroker(port=free_port()) as private:
        settings = Settings(kafka_bootstrap=private.bootstrap, retrain_queue_poll_seconds=3600)
        worker = RetrainWorker(settings)
        worker.start()
        try:
            assert worker.scheduler is not None and worker.scheduler.get_job(DRIFT_JOB_ID) is not None
            publisher = EventPublisher(settings, name="test").start()
            alert = AlertEvent(
                report_id="r1", model_version="v", drift_score=0.9, current_rows=500, reference_rows=900
            )
            publisher.publish(alert)
            publisher.close()
            deadline = time.monotonic() + 60
            while not runner.runs():
                assert time.monotonic() < deadline, "the drift alert queued no retrain"
                time.sleep(0.5)
            queued = runner.runs()[0]
            assert (queued.trigger, queued.status, queued.reason) == ("drift_alert", "queued", "drift report r1")
        finally:
            worker.shutdown()
