"""Safe promotion by real retrain runs: a rollback during a run is not undone, a worker stalled past its lease does
not promote, a crash in each window between the database and the champion pointer recovers consistently (the worker
is SIGKILLed while a real lock holds it at the step), and a champion that cannot load is measured around.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from feedback.store import FeedbackStore
from flywheel.access import AuditLog
from flywheel.database import Database
from flywheel.labels import LabelLedger
from flywheel.models.retrain import RetrainRunPublic, RunStatus, RunTrigger
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.lease import RetrainLock
from retrain.runner import RetrainRunner
from tests.conftest import copy_home, scratch_database_url, settings_from
from tests.conftest import run_cli as run_cli_here
from tests.flywheel.model_files import register_copy, truncate_weights
from tests.support import product_reviews

pytestmark = pytest.mark.slow
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
#: Short, so a killed or stalled worker's lease expires within the test.
LEASE_SECONDS = 2.0
T = TypeVar("T")


@dataclass
class Home:
    """A copy of the trained home on its own database, with the handles a test reads it through."""

    env: dict[str, str]
    url: str
    settings: Settings
    database: Database
    registry: ModelRegistry
    runner: RetrainRunner
    log: Path

    def latest(self) -> RetrainRunPublic | None:
        runs = self.runner.runs(1)
        return runs[0] if runs else None

    def used(self) -> dict[str, str | None]:
        """Feedback id -> the version it trained, for labels marked used."""
        return {f.feedback_id: f.used_by_version for f in FeedbackStore(self.database, self.settings).export()
                if f.status == "used"}

    def trainable(self) -> int:
        return len(LabelLedger(self.database).training_rows())

    def recover(self) -> int:
        """What the next worker does first: take the expired lease and settle what the dead one left."""
        wait_until(self.runner.lock.acquire, what="the dead worker's lease to expire", timeout=30)
        try:
            return self.runner.recover()
        finally:
            self.runner.lock.release()


@contextlib.contextmanager
def flywheel_home(trained_home: dict[str, str], tmp_path: Path, kind: str, **extra: str) -> Iterator[Home]:
    """A copy of the trained home on a fresh SQLite or PostgreSQL database, with 80 trusted product labels: enough
    for a retrain that promotes."""
    with scratch_database_url(kind, tmp_path) as url:
        env = {
            **copy_home(trained_home, tmp_path / "home"),
            "FLYWHEEL_DATABASE_URL": url,
            "FLYWHEEL_RETRAIN_MIN_EVAL_ROWS": "8",
            "FLYWHEEL_EPOCHS": "6",
            # The tiny task's holdout has 40 rows: one miss is 2.5 points, so allow two.
            "FLYWHEEL_RETRAIN_MAX_HOLDOUT_DROP": "0.05",
            "FLYWHEEL_RETRAIN_LEASE_SECONDS": str(LEASE_SECONDS),
            **extra,
        }
        settings = settings_from(env)
        database = Database(url).upgrade()
        registry = ModelRegistry(settings)
        store = FeedbackStore(database, settings)
        store.set_source("annotation", trusted=True)
        rows = product_reviews(80, seed=1)
        assert store.import_labels(zip(rows["text"], rows["label"], strict=True), source="annotation").created == 80
        try:
            yield Home(env, url, settings, database, registry, RetrainRunner(settings, database, registry,
                       progress=False), tmp_path / "retrain.log")
        finally:
            database.dispose()


@contextlib.contextmanager
def retrain_process(home: Home) -> Iterator[subprocess.Popen[bytes]]:
    """`flywheel retrain now` in its own process (output in ``home.log``); killed on exit if still running."""
    with open(home.log, "wb") as log:
        process = subprocess.Popen(
            [FLYWHEEL, "retrain", "now"], env={**os.environ, **home.env}, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(30)


def wait_until(condition: Callable[[], T | None], what: str, process: subprocess.Popen[bytes] | None = None,
               log: Path | None = None, timeout: float = 240.0) -> T:
    """Poll until ``condition`` returns something truthy (returned), failing if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            pytest.fail(f"the retrain exited ({process.returncode}) before {what}:\n"
                        f"{log.read_text()[-3000:] if log else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def promoting(home: Home) -> RetrainRunPublic | None:
    run = home.latest()
    return run if run is not None and run.status == RunStatus.PROMOTING else None


def plain_url(url: str) -> str:
    """The SQLAlchemy URL as libpq takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_a_rollback_during_a_retrain_is_not_undone(trained_home: dict[str, str], tmp_path: Path) -> None:
    # More epochs than usual: the rollback below must land while the challenger trains.
    with flywheel_home(trained_home, tmp_path, "sqlite", FLYWHEEL_EPOCHS="12") as home:
        first = home.registry.champion()
        second = register_copy(home.registry)
        home.registry.promote(second, reason="test")
        def started_from_second() -> RetrainRunPublic | None:
            run = home.latest()
            return run if run is not None and run.champion_version == second else None

        with retrain_process(home) as process:
            run = wait_until(started_from_second, "the run to start", process, home.log)
            rolled = run_cli_here(home.env, "models", "rollback")
            assert rolled.returncode == 0 and f"champion: {second} -> {first}" in rolled.stdout, rolled
            assert process.wait(300) == 0, home.log.read_text()[-3000:]

        run = home.runner.get(run.run_id)
        assert run.status == RunStatus.REJECTED, run
        assert (run.reason or "").startswith(
            f"the champion changed during the run: it started from {second}, the pointer now names {first}"
        ), run.reason
        assert home.registry.champion() == first, "the rollback stands"
        assert run.challenger_version not in home.registry.pointer().promoted
        assert home.used() == {} and home.trainable() == 80, "the labels wait for the next retrain"


def test_a_worker_stalled_past_its_lease_does_not_promote_when_it_resumes(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    with flywheel_home(trained_home, tmp_path, "sqlite") as home:
        champion = home.registry.champion()
        with retrain_process(home) as process:
            # Holding the pointer's lock stops the worker right before its compare-and-swap, labels marked.
            with home.registry.locked():
                run = wait_until(lambda: promoting(home), "the run to start promoting", process, home.log)
                assert set(home.used().values()) == {run.challenger_version}
                process.send_signal(signal.SIGSTOP)  # a stall: GC pause, frozen VM, database hang
                time.sleep(LEASE_SECONDS + 0.5)
                other = RetrainLock(home.database, 60)
                assert other.acquire(), "the stalled worker's lease expired and another worker took it"
            process.send_signal(signal.SIGCONT)
            process.wait(120)

        run = home.runner.get(run.run_id)
        assert run.status == RunStatus.FAILED, run
        assert f"lost the retrain lease (held by {other.holder} now)" in (run.reason or ""), run.reason
        assert "challenger was not promoted" in (run.reason or "")
        assert home.registry.champion() == champion
        assert home.used() == {} and home.trainable() == 80


def test_a_crash_inside_the_promoting_transaction_changes_nothing(trained_home: dict[str, str], tmp_path: Path) -> None:
    with flywheel_home(trained_home, tmp_path, "postgresql") as home:
        champion = home.registry.champion()
        with psycopg.connect(plain_url(home.url)) as blocker, psycopg.connect(plain_url(home.url),
                                                                               autocommit=True) as monitor:
            # Row locks on every label: the worker's UPDATE that marks them used waits inside its transaction.
            blocker.execute("SELECT feedback_id FROM feedback FOR UPDATE")
            with retrain_process(home) as process:
                wait_until(
                    lambda: monitor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query ILIKE 'UPDATE feedback%'"
                    ).fetchone() == (1,),
                    "the worker to mark its labels", process, home.log,
                )
                process.kill()
                process.wait(30)
            blocker.rollback()
        run = home.latest()
        assert run is not None and run.status == RunStatus.RUNNING, "nothing of the transaction committed"

        assert home.recover() == 1
        run = home.runner.get(run.run_id)
        assert run.status == RunStatus.FAILED and "stopped during the run" in (run.reason or ""), run
        assert home.registry.champion() == champion
        assert home.used() == {} and home.trainable() == 80


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_crash_before_the_pointer_swap_accepts_the_labels_again(
    trained_home: dict[str, str], tmp_path: Path, kind: str
) -> None:
    with flywheel_home(trained_home, tmp_path, kind) as home:
        champion = home.registry.champion()
        with retrain_process(home) as process, home.registry.locked():
            run = wait_until(lambda: promoting(home), "the run to start promoting", process, home.log)
            process.kill()
            process.wait(30)
        marked = home.used()
        assert marked and set(marked.values()) == {run.challenger_version}, "the crash left the labels marked"

        assert home.recover() == 1
        run = home.runner.get(run.run_id)
        assert run.status == RunStatus.FAILED, run
        assert f"stopped while promoting {run.challenger_version}; the champion was not changed" in (run.reason or "")
        assert home.registry.champion() == champion
        assert home.used() == {} and home.trainable() == 80, "every label is accepted again, for the next retrain"


def test_a_crash_after_the_pointer_swap_is_recorded_as_the_promotion(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    with flywheel_home(trained_home, tmp_path, "postgresql") as home:
        with retrain_process(home) as process, psycopg.connect(plain_url(home.url)) as blocker:
            with home.registry.locked():
                run = wait_until(lambda: promoting(home), "the run to start promoting", process, home.log)
                # Once the pointer's lock is free the worker swaps it, then waits on this row lock to record it.
                blocker.execute("SELECT run_id FROM retrain_run WHERE run_id = %s FOR UPDATE", [run.run_id])
            wait_until(lambda: home.registry.champion() == run.challenger_version, "the pointer swap", process,
                       home.log)
            process.kill()
            process.wait(30)
            blocker.rollback()
        assert home.runner.get(run.run_id).status == RunStatus.PROMOTING

        assert home.recover() == 1
        run = home.runner.get(run.run_id)
        assert run.status == RunStatus.PROMOTED and "stopped before recording it" in (run.reason or ""), run
        assert home.registry.champion() == run.challenger_version
        marked = home.used()
        assert len(marked) == run.feedback_train_rows and set(marked.values()) == {run.challenger_version}
        assert home.trainable() == 80 - run.feedback_train_rows, "the labels it learned from are not trained again"
        audit = AuditLog(home.database).recent(action="model.promote")
        assert [(e.target, e.detail.get("recovered")) for e in audit] == [(run.challenger_version, True)]


def test_a_retrain_whose_champion_cannot_load_measures_against_the_previous_one(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    with flywheel_home(trained_home, tmp_path, "sqlite") as home:
        first = home.registry.champion()
        second = register_copy(home.registry)
        home.registry.promote(second, reason="test")
        truncate_weights(home.registry, second)

        run = home.runner.run(RunTrigger.MANUAL)

        assert run is not None and run.champion_version == first, run
        assert f"champion {second} cannot be loaded, so the run measured against {first}" in (run.reason or "")
        assert run.status == RunStatus.PROMOTED, run
        # The compare-and-swap expected the broken champion, which the new one replaces.
        assert home.registry.champion() == run.challenger_version
        assert home.registry.pointer().history[-1].previous == second
