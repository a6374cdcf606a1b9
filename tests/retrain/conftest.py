"""Fixtures of the retrain tests: a copy of the tiny champion's home, its database, a runner and a feedback store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from feedback.store import FeedbackStore
from flywheel.database import Database
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.runner import RetrainRunner
from tests.conftest import copy_home


@pytest.fixture()
def home_env(trained_home: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = copy_home(trained_home, tmp_path / "home")
    env["FLYWHEEL_RETRAIN_MIN_EVAL_ROWS"] = "8"
    env["FLYWHEEL_EPOCHS"] = "6"
    # The tiny task's holdout has 40 rows: one miss is 2.5 points, so allow two.
    env["FLYWHEEL_RETRAIN_MAX_HOLDOUT_DROP"] = "0.05"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture()
def database(home_env: dict[str, str]) -> Iterator[Database]:
    database = Database.from_settings(Settings()).upgrade()
    yield database
    database.dispose()


@pytest.fixture()
def runner(database: Database) -> RetrainRunner:
    settings = Settings()
    return RetrainRunner(settings, database, ModelRegistry(settings), progress=False)


@pytest.fixture()
def store(database: Database) -> FeedbackStore:
    return FeedbackStore(database, Settings())


def label(store: FeedbackStore, rows: pd.DataFrame, source: str = "annotation") -> None:
    result = store.import_labels(zip(rows["text"], rows["label"], strict=True), source=source)
    assert result.created == len(rows)


def trust(store: FeedbackStore, source: str = "annotation") -> None:
    """Trust a principal as a reviewer would: nothing is trusted by default, and only trusted labels judge."""
    store.set_source(source, trusted=True)
