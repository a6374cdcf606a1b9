"""Fixtures of the retrain tests: a copy of the tiny champion's home, its database, a runner and a feedback store;
for the loop tests, the environment of a served home and its ingestion process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest

from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.runner import RetrainRunner
from tests.conftest import copy_home

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
ADMIN_TOKEN = "test-admin-token"


def loop_settings(env: dict[str, str], broker: EmbeddedBroker, group: str) -> dict[str, str]:
    """``env`` (a home with a champion) set up to serve, ingest into consumer ``group`` and retrain the tiny model."""
    return {
        **env,
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_INGEST_GROUP_ID": group,
        "FLYWHEEL_RELOAD_INTERVAL": "0.5",
        "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLYWHEEL_EPOCHS": "6",
        "FLYWHEEL_RETRAIN_MIN_EVAL_ROWS": "8",
        "FLYWHEEL_RETRAIN_MAX_HOLDOUT_DROP": "0.05",
        "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0",
    }


@pytest.fixture()
def loop_env(trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path) -> dict[str, str]:
    return loop_settings(copy_home(trained_home, tmp_path / "home"), broker, f"loop-{tmp_path.name}")


@contextmanager
def ingesting(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``flywheel ingest`` as a process, stopped with SIGTERM on exit."""
    process = subprocess.Popen(
        [FLYWHEEL, "ingest"], env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture()
def ingest(loop_env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with ingesting(loop_env) as process:
        yield process


def predict(http: httpx.Client, texts: list[str]) -> list[dict[str, object]]:
    response = http.post("/predict", json={"texts": texts})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


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
