"""Fixtures of the feedback tests: a migrated store on each database, a private broker, a TCP proxy, and the real
service (``bentoml serve``) on a scratch database with helpers to load and SIGKILL it."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from kafka import KafkaProducer
from sqlmodel import col, select

from feedback.ingestion import PredictionIngestor
from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import PredictionEvent, Topic, new_id, utcnow
from flywheel.models.feedback import Feedback, Prediction
from flywheel.settings import Settings
from tests.conftest import TcpProxy, copy_home, free_port, running_service, scratch_database_url

LABELS = ("negative", "positive")


def make_settings(home: Path, database_url: str, **overrides: object) -> Settings:
    """Settings for a test home on ``database_url`` with quick consumer timings."""
    values: dict[str, object] = {
        "home": home,
        "database_url": database_url,
        "ingest_max_poll_interval_ms": 2000,
        "ingest_retry_max_seconds": 1.0,
        "database_ready_timeout": 10.0,
        # These tests store predictions; embedding them would load the real base model into every ingestor and
        # share the cores with the test (tests/monitoring/test_stored_embeddings.py covers the embedding).
        "drift_embed_at_ingest": False,
        **overrides,
    }
    return Settings.model_validate(values)


def produce(bootstrap: str, payloads: list[bytes]) -> None:
    """Send raw payloads to the predictions topic and wait until the broker has them."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for payload in payloads:
            producer.send(Topic.PREDICTIONS.value, value=payload)
        producer.flush(10)
    finally:
        producer.close()


def stored_ids(store: FeedbackStore) -> list[str]:
    """Prediction ids in the store, one per stored row."""
    with store.database.read_session() as session:
        return list(session.exec(select(Prediction.prediction_id)))


def prediction(
    text: str, positive: float, prediction_id: str | None = None, at: datetime | None = None, version: str = "v1"
) -> PredictionEvent:
    """A prediction event of the binary sentiment model with P(positive) = ``positive``."""
    scores = {"negative": round(1 - positive, 6), "positive": positive}
    label = max(scores, key=lambda name: scores[name])
    return PredictionEvent(
        prediction_id=prediction_id or new_id(),
        model_version=version,
        text=text,
        label=label,
        confidence=scores[label],
        scores=scores,
        latency_ms=2.5,
        emitted_at=at or utcnow(),
    )


@pytest.fixture()
def store_factory(database_url: str, tmp_path: Path) -> Iterator[Callable[..., FeedbackStore]]:
    """Builds stores on the test database with setting overrides; disposes their engines afterwards."""
    databases: list[Database] = []

    def build(**overrides: object) -> FeedbackStore:
        url = str(overrides.pop("database_url", database_url))
        settings = make_settings(tmp_path / "home", url, **overrides)
        database = Database.from_settings(settings).upgrade()
        databases.append(database)
        return FeedbackStore(database, settings)

    yield build
    for database in databases:
        database.dispose()


@pytest.fixture()
def store(store_factory: Callable[..., FeedbackStore]) -> FeedbackStore:
    """A store with default vetting settings on a fresh, migrated database."""
    return store_factory()


@pytest.fixture()
def private_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test alone, so its topics hold only this test's events."""
    embedded = EmbeddedBroker(port=free_port()).start()
    yield embedded
    embedded.stop()


@contextlib.contextmanager
def running_ingestor(store: FeedbackStore, group: str = "test-ingest") -> Iterator[PredictionIngestor]:
    """Run an ingestor (with the store's settings) in a thread until the block ends, once it owns its partitions."""
    ingestor = PredictionIngestor(store.settings, store, group_id=group)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            ingestor.run()
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which fails with it
            failure.append(exc)

    thread = threading.Thread(target=run, name="ingestor", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not ingestor.assigned.is_set():
        assert not failure, f"ingestor failed: {failure[0]!r}"
        assert time.monotonic() < deadline, "ingestor did not join its consumer group in 30s"
        time.sleep(0.05)
    try:
        yield ingestor
    finally:
        ingestor.stop()
        thread.join(30)
        assert not thread.is_alive(), "ingestor did not stop"
    assert not failure, f"ingestor failed: {failure[0]!r}"


@pytest.fixture()
def tcp_proxy() -> Iterator[Callable[[tuple[str, int]], TcpProxy]]:
    """Starts TCP proxies to a target; all are stopped after the test."""
    proxies: list[TcpProxy] = []

    def start(target: tuple[str, int]) -> TcpProxy:
        proxies.append(TcpProxy(target).start())
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.stop()


@dataclass(frozen=True)
class Service:
    """A running ``bentoml serve`` of the Flywheel service and the database it stores feedback in."""

    base: str
    port: int
    database_url: str
    log: Path

    def stored(self, feedback_ids: list[str]) -> set[str]:
        """Which of ``feedback_ids`` are rows of the service's database, read by a connection of this test."""
        database = Database(self.database_url)
        try:
            with database.read_session() as session:
                query = select(Feedback.feedback_id).where(col(Feedback.feedback_id).in_(feedback_ids))
                return set(session.exec(query))
        finally:
            database.dispose()

    def killer(self) -> Callable[[], None]:
        """A function that SIGKILLs the server and every worker at once (BentoML runs each worker in a process group
        of its own). The processes are found now, so the kill itself costs only the signals."""
        servers = [
            process
            for process in psutil.process_iter(["cmdline"])
            if "serve" in (command := process.info["cmdline"] or [])
            and "--port" in command
            and command[command.index("--port") + 1] == str(self.port)
        ]
        assert servers, f"no `bentoml serve --port {self.port}` process"
        tree = [servers[0], *servers[0].children(recursive=True)]

        def kill() -> None:
            for member in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.send_signal(signal.SIGKILL)
            psutil.wait_procs(tree, timeout=10)

        return kill


@contextlib.contextmanager
def feedback_service(
    kind: str, trained_home: dict[str, str], bootstrap: str, directory: Path, **env: str
) -> Iterator[Service]:
    """The real service (one worker, no rate limit) on a fresh ``kind`` database; ``env`` adds FLYWHEEL_* values."""
    with scratch_database_url(kind, directory) as url:
        full_env = {
            **copy_home(trained_home, directory / "home"),
            "FLYWHEEL_DATABASE_URL": url,
            "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
            "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0",
            **env,
        }
        port = free_port()
        with running_service(full_env, port=port) as base:
            yield Service(base, port, url, Path(full_env["FLYWHEEL_HOME"]) / f"serve-{port}.log")


def post_concurrently(
    base: str, bodies: list[dict[str, Any]], clients: int, on_answer: Callable[[httpx.Response], None] | None = None
) -> list[httpx.Response | Exception]:
    """POST each body to ``/feedback`` from ``clients`` threads at once; each answer (or transport error) in order.

    ``on_answer`` runs in the client's thread right after each answer arrives, before that client sends again.
    """
    local = threading.local()
    start = threading.Barrier(min(clients, len(bodies)))
    opened: list[httpx.Client] = []

    def send(body: dict[str, Any]) -> httpx.Response | Exception:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=base, timeout=30)
            opened.append(local.http)
            start.wait(30)  # every client is ready: the first requests arrive together
        try:
            response = local.http.post("/feedback", json=body)
        except httpx.HTTPError as exc:
            return exc
        if response.status_code >= 500:
            # The server closes a connection after an unhandled error: the next request goes on a new one.
            local.http = httpx.Client(base_url=base, timeout=30)
            opened.append(local.http)
        if on_answer is not None:
            on_answer(response)
        return response

    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            return list(pool.map(send, bodies))
    finally:
        for http in opened:
            http.close()
