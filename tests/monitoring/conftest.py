"""Fixtures of the monitoring tests: a private copy of the trained home and current windows built from texts."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlmodel import func, select

from flywheel.database import Database
from flywheel.events import new_id, utcnow
from flywheel.models.feedback import Prediction
from flywheel.settings import Settings
from monitoring.monitor import DriftMonitor
from monitoring.window import CurrentWindow
from tests.conftest import copy_home, wait_until
from tests.support import synthetic_sentiment

FINANCE_WORDS = [
    "stocks", "bonds", "market", "investors", "earnings", "quarterly", "dividend", "inflation", "interest",
    "rates", "bank", "shares", "fund", "portfolio", "revenue", "profit", "tax", "loan", "credit", "budget",
]  # fmt: skip
GERMAN_WORDS = [
    "der", "die", "das", "würde", "schöne", "geschichte", "schauspieler", "großartig", "schrecklich", "langweilig",
    "überraschend", "wunderschön", "enttäuschend", "natürlich", "müde", "fröhlich", "häßlich", "zuschauer",
]  # fmt: skip


def word_sentences(words: list[str], n: int, seed: int) -> list[str]:
    """``n`` texts of 5-9 words drawn from ``words``, numbered like the synthetic task's texts."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(5, 9))) + f" {i}" for i in range(n)]


def same_texts(n: int, seed: int = 11) -> list[str]:
    """Texts from the distribution the tiny champion was trained on (numbered 0-399 like its training texts)."""
    return synthetic_sentiment(400, seed=seed)["text"].sample(n, random_state=seed).tolist()


@pytest.fixture(scope="session")
def monitor_settings(trained_home: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of a private copy of the trained home, with small drift windows allowed."""
    env = copy_home(trained_home, tmp_path_factory.mktemp("monitor") / "home")
    values = {k.removeprefix("FLYWHEEL_").lower(): v for k, v in env.items()}
    return Settings(**values, drift_targeted_labels=20)


@pytest.fixture(scope="session")
def drift_monitor(monitor_settings: Settings) -> DriftMonitor:
    """A monitor on the tiny champion; it keeps the model loaded across tests."""
    return DriftMonitor(monitor_settings)


@pytest.fixture(scope="session")
def make_window(drift_monitor: DriftMonitor):  # type: ignore[no-untyped-def]
    """Build a current window from texts, with the champion's real predictions as the logged ones."""

    def build(texts: list[str], feedback: list[str | None] | None = None) -> CurrentWindow:
        entry = drift_monitor.registry.champion_version()
        classifier = drift_monitor.classifier(entry)
        probs = classifier.predict_proba(texts).probs
        now = utcnow()
        frame = pd.DataFrame(
            {
                "prediction_id": [new_id() for _ in texts],
                "text": texts,
                "predicted": [classifier.labels[i] for i in probs.argmax(axis=1)],
                "confidence": probs.max(axis=1).astype(float),
                "model_version": entry.version,
                "created_at": [now - timedelta(seconds=len(texts) - i) for i in range(len(texts))],
                "feedback_label": feedback if feedback is not None else [None] * len(texts),
            }
        )
        return CurrentWindow(frame=frame, rule="test window", start=now - timedelta(hours=1), end=now)

    return build


#: The installed console script, for the commands that must run in their own process (`flywheel ingest`).
FLYWHEEL = shutil.which("flywheel") or str(Path(sys.executable).parent / "flywheel")


def count_predictions(url: str) -> int:
    """Predictions stored in the database at ``url``."""
    database = Database(url)
    try:
        with database.read_session() as session:
            return int(session.exec(select(func.count()).select_from(Prediction)).one())
    finally:
        database.dispose()


def ingest_all(env: dict[str, str], rows: int, timeout: float = 90) -> None:
    """Run `flywheel ingest` (its own consumer group) until the home's database holds ``rows`` predictions."""
    database_url = f"sqlite:///{Path(env['FLYWHEEL_HOME']) / 'flywheel.db'}"
    ingest = subprocess.Popen(
        [FLYWHEEL, "ingest", "--group", f"ingest-{uuid.uuid4().hex[:6]}"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: count_predictions(database_url) >= rows, timeout, "ingestion")
    finally:
        ingest.send_signal(signal.SIGTERM)
        ingest.communicate(timeout=30)
