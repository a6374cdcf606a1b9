"""Shared fixtures: a tiny base model, a synthetic dataset, an isolated state directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.events import Event
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
    migrate(settings.resolved_database_url)
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


def migrate(url: str) -> None:
    """Apply the migrations to ``url``, as ``flywheel db upgrade`` does before anything starts."""
    from flywheel.database import Database

    Database(url).upgrade().dispose()


@contextmanager
def scratch_database_url(kind: str, directory: Path, migrated: bool = True) -> Iterator[str]:
    """URL of a fresh database, migrated unless ``migrated`` is false: a SQLite file in ``directory``, or a
    uniquely named PostgreSQL database on 127.0.0.1:5432, dropped (connections and all) on exit.
    """
    if kind == "sqlite":
        url = f"sqlite:///{directory / 'flywheel.db'}"
        if migrated:
            migrate(url)
        yield url
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
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty (unmigrated) Flywheel database on SQLite, then on PostgreSQL (see ``scratch_database_url``)."""
    with scratch_database_url(request.param, tmp_path, migrated=False) as url:
        yield url


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


@contextmanager
def running_service(
    env: dict[str, str],
    port: int | None = None,
    timeout: float = 120.0,
    wait_for: str = "/readyz",
    *,
    target: str = "service.service:TextClassifier",
    cwd: Path | None = None,
) -> Iterator[str]:
    """Run ``bentoml serve`` for the Flywheel service as a subprocess; yields its base URL once /readyz is 200.

    ``env`` holds FLYWHEEL_* variables: a home with a champion (``trained_home`` or a ``copy_home`` of it) and
    ``FLYWHEEL_KAFKA_BOOTSTRAP=broker.bootstrap``. One worker and one torch thread unless ``env`` says otherwise.
    ``wait_for="/healthz"`` yields as soon as the server is alive, ready or not. ``target`` may be a built Bento's
    tag, served from ``cwd`` (default: the repository root).
    The server's output goes to ``<home>/serve-<port>.log``; the whole process group is killed on exit.
    """
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = port or free_port()
    home = Path(env["FLYWHEEL_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        # Per-home BentoML state: `bentoml serve` wipes its Prometheus directory, so servers must not share one.
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "FLYWHEEL_SERVE_WORKERS": "1",
        "FLYWHEEL_TORCH_THREADS": "1",
        **env,
    }
    log_path = home / f"serve-{port}.log"
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd or Path(__file__).parent.parent, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}{wait_for}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready after {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url
    finally:
        # SIGTERM lets workers flush their events; SIGKILL then reaps anything left in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def read_topic(bootstrap: str, topic: str, done: Callable[[list[Event]], bool], timeout: float = 30.0) -> list[Event]:
    """Decode every event on ``topic`` from the beginning, polling until ``done(events)`` or ``timeout``."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    from flywheel.events import decode

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        deadline = time.monotonic() + timeout
        while not (partitions := consumer.partitions_for_topic(topic)) and time.monotonic() < deadline:
            time.sleep(0.1)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions or ())])
        events: list[Event] = []
        while not done(events) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                events.extend(decode(topic, record.value) for record in records)
        return events
    finally:
        consumer.close()


def wait_for_store(http: httpx.Client, timeout: float = 60.0) -> None:
    """Block until the service's feedback store is open: it opens in the background, answering 503 until then."""
    import time

    deadline = time.monotonic() + timeout
    while (response := http.get("/feedback/none")).status_code != 404:
        assert time.monotonic() < deadline, f"feedback store not ready: {response.status_code} {response.text}"
        time.sleep(0.3)
