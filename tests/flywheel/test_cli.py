"""The ``flywheel`` commands: in this process through the console script's ``main``, and once as the installed
script in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
run = run_cli

FLYWHEEL = shutil.which("flywheel") or str(Path(os.sys.executable).parent / "flywheel")  # type: ignore[attr-defined]


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLYWHEEL, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False
    )


def test_train_list_promote_rollback_evaluate(flywheel_env: dict[str, str], synthetic_csv: Path) -> None:
    first = run(flywheel_env, "train", "--data", str(synthetic_csv))
    assert first.returncode == 0, first.stderr
    assert "data quality: 400 rows in" in first.stdout
    assert "macro-F1" in first.stdout and "now champion" in first.stdout

    second = run(flywheel_env, "train", "--data", str(synthetic_csv), "--promote", "--epochs", "2")
    assert second.returncode == 0, second.stderr
    listing = run(flywheel_env, "models", "list")
    versions = [line.split()[1] for line in listing.stdout.splitlines() if line.startswith("│ ")][:2]
    assert len(versions) == 2
    assert "*" in next(line for line in listing.stdout.splitlines() if versions[1] in line)

    rollback = run(flywheel_env, "models", "rollback")
    assert rollback.returncode == 0, rollback.stderr
    assert rollback.stdout.strip() == f"champion: {versions[1]} -> {versions[0]}"
    promote = run(flywheel_env, "models", "promote", versions[1])
    assert promote.stdout.strip() == f"champion: {versions[0]} -> {versions[1]}"

    shown = run(flywheel_env, "models", "show", versions[0])
    assert '"labels": [' in shown.stdout

    evaluation = run(flywheel_env, "evaluate", "--data", str(synthetic_csv))
    assert evaluation.returncode == 0, evaluation.stderr
    assert versions[1] in evaluation.stdout and "precision" in evaluation.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "/nonexistent/data.csv"], "error: dataset file not found: /nonexistent/data.csv"),
        (["models", "promote", "nope"], "error: model version 'nope' not found"),
        (["models", "rollback"], "error: nothing to roll back to"),
        (["evaluate", "--data", "/nonexistent.csv"], "error: no champion model yet"),
    ],
)
def test_user_errors_print_one_line_and_exit_nonzero(
    flywheel_env: dict[str, str], args: list[str], message: str
) -> None:
    result = run(flywheel_env, *args)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_bad_file_prints_one_line(flywheel_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\nnice,pos\n")
    # As a user runs it: the installed console script in its own process.
    result = run_script(flywheel_env, "train", "--data", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {bad} has no column 'text'; found ['review', 'label'] "
        "(set FLYWHEEL_TEXT_COLUMN / FLYWHEEL_LABEL_COLUMN to use other names)"
    )
