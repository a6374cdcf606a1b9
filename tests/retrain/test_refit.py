"""Every fresh label judges and teaches: the gate judges a recipe on trusted labels its models never learned (one
model per fold, or a single held-out slice), then the recipe trains again with every label and serves in the judged
candidate's place, unless it forgets."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from feedback.store import FeedbackStore
from flywheel.labels import LabelLedger
from flywheel.models.retrain import RunStatus, RunTrigger
from flywheel.text import dedupe_key
from retrain.dataset import assemble
from retrain.gate import GateLimits, GateScores, refit_refused, summary
from retrain.model_history import load_history
from retrain.models_page import Viewer, index_page
from retrain.runner import RetrainRunner
from tests.conftest import run_cli
from tests.retrain.conftest import label, trust
from tests.support import product_reviews

LIMITS = GateLimits(min_gain=0.0, max_holdout_drop=0.01, max_class_drop=0.03)


def refitting(runner: RetrainRunner, **settings: object) -> RetrainRunner:
    """The fixture's runner with the default refit on and two folds (the suite's tiny settings turn both off)."""
    update = {"retrain_refit": True, "retrain_folds": 2, **settings}
    return RetrainRunner(runner.settings.model_copy(update=update), runner.database, runner.registry, progress=False)


def texts(frame: pd.DataFrame) -> set[str]:
    return set(frame["text"].map(dedupe_key))


@pytest.mark.slow
def test_every_trusted_label_judges_a_model_that_never_learned_it_and_the_served_model_learns_from_all(
    runner: RetrainRunner, store: FeedbackStore
) -> None:
    trust(store)
    label(store, product_reviews(160, seed=1))
    crossfit = refitting(runner)
    settings, champion = crossfit.settings, runner.registry.champion_version()
    folds = [assemble(champion, LabelLedger(runner.database).training_rows(), settings, settings.seed, fold=fold)
             for fold in (0, 1)]
    held_out = [texts(fold.feedback_eval) for fold in folds]
    assert not held_out[0] & held_out[1] and len(held_out[0]) + len(held_out[1]) == 160

    run = crossfit.run(RunTrigger.MANUAL)

    assert run is not None and run.status == RunStatus.PROMOTED, run
    # The gate judged the recipe on all 160 trusted labels, each by the fold model that never learned it.
    assert run.feedback_eval_rows == 160 and (run.gate_evidence or {})["folds"] == 2
    assert run.candidates is not None and [c["name"] for c in run.candidates] == ["warm", "warm+held-out"]
    judged, refit = run.candidates
    assert len(judged["folds"]) == 2 and judged["version"] == judged["folds"][0]
    for version, fold_texts in zip(judged["folds"], held_out, strict=True):
        learned = texts(pd.read_parquet(runner.registry.get(version).training_data_path))
        assert learned and not learned & fold_texts
    # The served model learned from every label but the few that chose its checkpoint.
    served = texts(pd.read_parquet(runner.registry.get(refit["version"]).training_data_path))
    assert folds[0].validation is not None
    checkpoint_rows = texts(folds[0].validation[folds[0].validation["group"] == "feedback"])
    assert checkpoint_rows and (held_out[0] | held_out[1]) - checkpoint_rows <= served
    assert runner.registry.champion() == run.challenger_version == refit["version"]
    assert statuses(store).to_dict() == {"used": 160}
    # The model page names both fold models of the recipe and says how it was judged.
    history = load_history(runner.registry, runner.database, lambda *_: {})
    html = index_page(history, Viewer("ops", "reviewer", anonymous=False, admin=False), reload_seconds=0.5)
    assert f'fold model <a href="/models/{judged["folds"][1]}">' in html
    assert "160 trusted ones judged out of fold: each recipe trained 2 models" in html


def statuses(store: FeedbackStore) -> pd.Series:
    return pd.Series([row.status for row in store.export()], dtype=str).value_counts()


@pytest.mark.slow
def test_a_promoted_run_serves_its_recipe_trained_again_with_the_held_out_slice(
    runner: RetrainRunner, store: FeedbackStore, home_env: dict[str, str]
) -> None:
    trust(store)
    label(store, product_reviews(160, seed=1))
    run = refitting(runner, retrain_folds=1).run(RunTrigger.MANUAL)

    assert run is not None and run.status == RunStatus.PROMOTED, run
    assert run.candidates is not None and [c["name"] for c in run.candidates] == ["warm", "warm+held-out"]
    judged, refit = run.candidates
    assert refit["refit_of"] == "warm" and refit["refused"] is None, refit
    # It learned from the slice, so the record keeps no slice score for it, only its retained rows.
    assert refit["feedback_macro_f1"] is None and refit["holdout_rows"] == judged["holdout_rows"] > 0
    assert run.gate_evidence is not None
    assert run.gate_evidence["chosen"] == "warm" and run.gate_evidence["served"] == "warm+held-out"
    assert runner.registry.champion() == run.challenger_version == refit["version"] != judged["version"]
    assert run.challenger_metrics is not None and run.challenger_metrics["feedback"] is None
    assert "serving warm+held-out" in (run.reason or "")
    # Every fresh label taught the served model: those that trained the candidate and those that judged it.
    trained = set(pd.read_parquet(runner.registry.get(refit["version"]).training_data_path)["text"].map(dedupe_key))
    judged_on = set(pd.read_parquet(runner.registry.get(judged["version"]).training_data_path)["text"].map(dedupe_key))
    assert len(trained - judged_on) == run.feedback_eval_rows
    assert statuses(store).to_dict() == {"used": run.feedback_train_rows + run.feedback_eval_rows}
    assert {row.used_by_version for row in store.export()} == {refit["version"]}
    # `flywheel runs` lists it although it has no slice score to print.
    runs = run_cli(home_env, "runs")
    assert runs.returncode == 0 and "promoted" in runs.stdout and not runs.stderr, runs.stderr
    # The model page tells the judged candidate from the model that served in its place.
    history = load_history(runner.registry, runner.database, lambda *_: {})
    html = index_page(history, Viewer("ops", "reviewer", anonymous=False, admin=False), reload_seconds=0.5)
    assert "chosen for the gate, warm+held-out served in its place" in html
    assert "served in place of warm: its recipe again with the held-out labels, which it has no score on" in html


@pytest.mark.slow
def test_out_of_time_the_judged_candidates_first_model_serves_and_its_held_out_labels_wait(
    runner: RetrainRunner, store: FeedbackStore
) -> None:
    trust(store)
    label(store, product_reviews(160, seed=1))
    # A budget the first candidate already overruns: nothing more is trained.
    run = refitting(runner, retrain_time_budget_minutes=1e-4).run(RunTrigger.MANUAL)

    assert run is not None and run.status == RunStatus.PROMOTED, run
    assert run.candidates is not None and [c["name"] for c in run.candidates] == ["warm", "warm+held-out"]
    skipped = run.candidates[1]
    assert skipped["refit_of"] == "warm" and skipped["skipped"].startswith("time budget:"), skipped
    assert runner.registry.champion() == run.challenger_version == run.candidates[0]["version"]
    assert "served" not in (run.gate_evidence or {})
    # The first fold model learned the labels of the other fold; its own fold's labels wait for the next run.
    assert run.feedback_train_rows == 80
    assert statuses(store).to_dict() == {"used": 80, "accepted": 80}


def test_a_refit_serves_only_if_it_keeps_the_retained_rows_against_the_champion_and_the_judged_candidate() -> None:
    champion = GateScores(holdout_macro_f1=0.80, feedback_macro_f1=0.60, holdout_class_f1={"a": 0.8, "b": 0.8})
    judged = GateScores(holdout_macro_f1=0.82, feedback_macro_f1=0.75, holdout_class_f1={"a": 0.82, "b": 0.82})
    refit = judged.model_copy(update={"feedback_macro_f1": math.nan})
    assert refit_refused(champion, judged, refit, LIMITS) is None
    # Still within a point of the champion, but 1.5 points below the candidate the gate judged.
    slipped = refit.model_copy(update={"holdout_macro_f1": 0.805, "holdout_class_f1": {"a": 0.805, "b": 0.805}})
    refused = refit_refused(champion, judged, slipped, LIMITS)
    assert refused is not None and refused.startswith("against the judged candidate, golden holdout fell"), refused
    # A class the champion knew, lost: refused against the champion first.
    lost = refit.model_copy(update={"holdout_class_f1": {"a": 0.90, "b": 0.74}})
    refused = refit_refused(champion, judged, lost, LIMITS)
    assert refused is not None and refused.startswith("against the champion, holdout F1 of class 'b'"), refused
    # The slice it learned from gives no score: its summary shows the retained rows only.
    assert summary(champion, slipped) == "holdout macro-F1 0.8000 -> 0.8050 (+0.0050)"
