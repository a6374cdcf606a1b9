"""Shared fixtures: a tiny base model, a synthetic dataset, an isolated state directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.settings import Settings
from tests.support import build_tiny_base, synthetic_sentiment

TINY_TRAINING_ENV = {
    "FLYWHEEL_EPOCHS": "4",
    "FLYWHEEL_LEARNING_RATE": "0.002",
    "FLYWHEEL_BATCH_SIZE": "16",
    "FLYWHEEL_MAX_LENGTH": "32",
    "FLYWHEEL_PATIENCE": "4",
    "FLYWHEEL_TORCH_THREADS": "2",
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised BERT saved as a local base model."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 rows of the easy synthetic sentiment task as CSV."""
    path = tmp_path_factory.mktemp("data") / "synthetic.csv"
    synthetic_sentiment(400).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, str]:
    """A state directory whose registry holds one tiny champion model; returns its FLYWHEEL_* env.

    Session-scoped and shared: tests that change the registry copy it with ``copy_home`` first.
    """
    from flywheel.registry import ModelRegistry
    from retrain.pipeline import TrainingPipeline
    from retrain.trainer import Trainer

    home = tmp_path_factory.mktemp("trained") / "home"
    env = {"FLYWHEEL_HOME": str(home), "FLYWHEEL_BASE_MODEL": str(tiny_base), **TINY_TRAINING_ENV}
    settings = Settings(**{k.removeprefix("FLYWHEEL_").lower(): v for k, v in env.items()})
    TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False)).run(synthetic_sentiment(400))
    return env


def copy_home(env: dict[str, str], destination: Path) -> dict[str, str]:
    """Copy a Flywheel home (registry included) so a test can change it; returns the new env."""
    import shutil

    shutil.copytree(env["FLYWHEEL_HOME"], destination)
    return {**env, "FLYWHEEL_HOME": str(destination)}


@pytest.fixture()
def flywheel_env(tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for an isolated Flywheel home that trains the tiny model fast."""
    env = {
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        "FLYWHEEL_BASE_MODEL": str(tiny_base),
        **TINY_TRAINING_ENV,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    return env


@pytest.fixture()
def settings(flywheel_env: dict[str, str]) -> Settings:
    """Settings for the isolated home."""
    return Settings()


@pytest.fixture(scope="session")
def synthetic_frame() -> pd.DataFrame:
    """The synthetic task as a frame."""
    return synthetic_sentiment(400)


#: Maintenance connection of the test PostgreSQL server (trust auth); each test gets its own database on it.
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty Flywheel database: a SQLite file, or a uniquely named PostgreSQL database.

    The PostgreSQL database is created on 127.0.0.1:5432 and dropped (connections and all) afterwards. Tables
    appear once something runs ``feedback.database.Database(url).start()`` (which applies the migrations).
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'flywheel.db'}"
        return
    import uuid

    import psycopg

    name = f"flywheel_test_{uuid.uuid4().hex[:16]}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL for tests is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (tansu) on a free loopback port, shared by the session."""
    embedded = EmbeddedBroker(port=free_port()).start()
    yield embedded
    embedded.stop()
