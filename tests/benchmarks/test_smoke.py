"""Each learning benchmark runs end to end on the tiny model, so a change that breaks a script fails here.

The figures are meaningless at this size: the real runs (real base model, full sizes) live outside the suite and
their results in the README. Only what a script must always do is checked: it finishes and prints its table and its
verdict line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_TRAINING_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MOVIES = ROOT.parent / "shared" / "data" / "rotten_tomatoes.csv"


@pytest.fixture()
def bench(tiny_base: Path, tmp_path: Path) -> dict[str, str]:
    """The environment of a smoke run: the tiny base model trained fast, a gate that decides on a few rows."""
    if not MOVIES.exists():
        pytest.skip(f"the benchmarks' movie reviews are not at {MOVIES}")
    return {
        **os.environ,
        **TINY_TRAINING_ENV,
        "FLYWHEEL_BASE_MODEL": str(tiny_base),
        "FLYWHEEL_RETRAIN_MIN_EVAL_ROWS": "5",
        "TMPDIR": str(tmp_path),
    }


def run(script: str, env: dict[str, str], *args: str) -> str:
    """Run ``benchmarks/SCRIPT`` to completion; its output."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--data", str(MOVIES), "--threads", "2", *args],
        check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_bench_compares_training_with_both_baselines(bench: dict[str, str]) -> None:
    out = run("train_bench.py", bench, "--rows", "200", "--seeds", "1", "--test-rows", "200")
    assert "frozen+LR" in out and "tfidf+LR" in out, out
    assert "test set: 200 rows" in out and "no worse than best" in out, out


def test_loop_bench_scores_a_retrain_on_a_new_domain(bench: dict[str, str]) -> None:
    out = run("loop_bench.py", bench, "--seeds", "1", "--champion-rows", "200", "--corrections", "40",
              "--old-domain-rows", "200", "--domains", "support")
    assert "support: mean gain" in out and "seeds meet" in out, out
    assert "old domain: 200 movie reviews" in out
    # Every candidate the run trained, beside the champion, on the gate's sets and the benchmark's.
    assert "every candidate:" in out and "   0 support   champion " in out, out


def test_loop_bench_task_grows_the_head_for_a_label_added_after_launch(bench: dict[str, str]) -> None:
    out = run("loop_bench.py", bench, "--task", "finance3", "--seeds", "1", "--corrections", "60",
              "--new-labels", "neutral")
    # The champion never saw `neutral`; its line shows the champion's 0 and what the served model made of it.
    assert "task finance3" in out and "seeds promoted" in out, out
    assert any(line.startswith("neutral ") and "0.000 ->" in line for line in out.splitlines()), out


def test_active_bench_compares_the_queue_with_random_order(bench: dict[str, str]) -> None:
    out = run("active_bench.py", bench, "--champion-rows", "200", "--budgets", "30", "--random-seeds", "1",
              "--pool-rows", "60")
    assert "random mean" in out and "queue-30" in out, out


def test_augment_bench_compares_each_augmentation_with_none(bench: dict[str, str]) -> None:
    out = run("augment_bench.py", bench, "--sizes", "100", "--seeds", "1", "--augmentations", "none,swap",
              "--checker-rows", "300", "--agreement-sample", "30")
    assert "100 rows         holdout     swap" in out and "label agreement" in out, out
    assert "default: " in out, out
