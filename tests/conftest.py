"""Shared fixtures: a tiny base model, a synthetic dataset, an isolated state directory."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.events import Event
from flywheel.http import wait_until_ready
from flywheel.settings import Settings
from tests.support import build_tiny_base, synthetic_sentiment

if TYPE_CHECKING:
    from fastapi.testclient import TestClient
    from playwright.sync_api import Browser
    from playwright.sync_api import Page as BrowserPage

TINY_TRAINING_ENV = {
    "FLYWHEEL_EPOCHS": "4",
    "FLYWHEEL_LEARNING_RATE": "0.002",
    "FLYWHEEL_BATCH_SIZE": "16",
    "FLYWHEEL_MAX_LENGTH": "32",
    "FLYWHEEL_PATIENCE": "4",
    "FLYWHEEL_TORCH_THREADS": "2",
    # The tiny model learns the synthetic task in a few epochs: no minimum of steps, one challenger per retrain.
    "FLYWHEEL_MIN_TRAIN_STEPS": "1",
    "FLYWHEEL_RETRAIN_CANDIDATES": "warm",
    # One held-out slice judges, and the judged candidate itself serves; tests/retrain/test_refit.py covers the
    # defaults (a model per fold, then the recipe again on every label), which would triple every test retrain.
    "FLYWHEEL_RETRAIN_FOLDS": "1",
    "FLYWHEEL_RETRAIN_REFIT": "false",
    # Exporting and measuring the ONNX variants costs seconds per registered version, which most tests register
    # many of; tests/flywheel/test_runtime.py trains with the default (auto) and covers the runtimes.
    "FLYWHEEL_RUNTIME": "torch",
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
    settings = settings_from(env)
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
    import signal
    import sys

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
        wait_until_ready(
            url, timeout=timeout, path=wait_for, exited=process.poll, context=lambda: log_path.read_text()[-4000:]
        )
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


def settings_from(env: dict[str, str]) -> Settings:
    """Settings from ``FLYWHEEL_*`` variables given as a dict (the process environment is not read for them)."""
    return Settings(**{k.removeprefix("FLYWHEEL_").lower(): v for k, v in env.items() if k.startswith("FLYWHEEL_")})


@contextmanager
def app_client(
    env: dict[str, str], *, wait_ready: bool = True, timeout: float = 60.0, headers: dict[str, str] | None = None
) -> Iterator[TestClient]:
    """The service's whole HTTP API in this process: ``create_app`` on a real database, broker and model.

    ``env`` is as for ``running_service``. Yields a client (sending ``headers`` with every request) once
    ``/readyz`` answers 200 (unless ``wait_ready`` is false); everything is stopped, and queued events flushed,
    on exit.
    """

    from fastapi.testclient import TestClient

    from flywheel.access import Principals
    from flywheel.database import BackgroundDatabase
    from flywheel.publisher import EventPublisher
    from flywheel.registry import ModelRegistry
    from service.app import create_app
    from service.metrics import service_metrics
    from service.readiness import DatabaseProbe, Readiness
    from service.serving import ModelServer

    settings = settings_from(env)
    publisher = EventPublisher(settings, name="test-app").start()
    database = BackgroundDatabase(settings, pool_size=8).start()
    serving = ModelServer(settings, ModelRegistry(settings), service_metrics()).start()
    principals = Principals(settings, database, refresh_seconds=0.5).start()
    probe = DatabaseProbe(database, interval=0.5).start()
    readiness = Readiness(serving, publisher, probe, serving.watcher.alive, principals.loaded)
    try:
        app = create_app(settings, database, publisher, serving, principals, readiness=readiness)
        with TestClient(app, raise_server_exceptions=False, headers=headers) as client:
            deadline = time.monotonic() + timeout
            while wait_ready and (ready := client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, f"app not ready after {timeout:.0f}s: {ready.text}"
                time.sleep(0.1)
            yield client
    finally:
        probe.stop()
        principals.stop()
        serving.stop()
        publisher.close()
        database.close()


def local_metric(name: str, **labels: str) -> float:
    """Sum of this process's samples called ``name`` whose labels include ``labels`` (0 when there are none)."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)


class TcpProxy:
    """A loopback TCP proxy that can be stopped (dropping every connection) and started again on its port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut the open ones, like a crashed server."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``flywheel ARGS`` in this process, as the console script runs it: its output, errors and exit code.

    For commands that finish by themselves (no servers, nothing waiting for a signal); it saves each call the
    seconds a new interpreter spends importing torch and friends. ``env`` is applied to ``os.environ`` for the call
    only, and the logging set-up and signal handlers the command installs are undone afterwards.
    """
    import io
    import signal
    import sys
    from contextlib import redirect_stderr, redirect_stdout

    from stack.cli import main

    saved_env = dict(os.environ)
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level, sys.argv)
    # Some commands (`retrain now`) install signal handlers; this process keeps its own.
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    os.environ.update(env)
    sys.argv = ["flywheel", *args]
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:], level, sys.argv = saved_logging
        root.setLevel(level)
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(["flywheel", *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's headless chromium driven by Playwright (keyboard, forms, cookies), shared by one file's tests.

    Not by the whole session: Playwright's sync API keeps an event loop running in the thread while it is open, and
    the other tests' ``asyncio.run`` refuses to start inside a running loop.
    """
    import shutil

    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium (make install does it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[BrowserPage]:
    """A fresh browser context (no cookies) and one page in it, closed after the test."""
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()
