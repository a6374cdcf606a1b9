"""Fixtures of the feedback tests: a migrated store on each database, a private broker, a TCP proxy."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer
from sqlmodel import select

from feedback.ingestion import PredictionIngestor
from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import PredictionEvent, Topic, new_id, utcnow
from flywheel.models.feedback import Prediction
from flywheel.settings import Settings
from tests.conftest import TcpProxy, free_port

LABELS = ("negative", "positive")


def make_settings(home: Path, database_url: str, **overrides: object) -> Settings:
    """Settings for a test home on ``database_url`` with quick consumer timings."""
    values: dict[str, object] = {
        "home": home,
        "database_url": database_url,
        "ingest_max_poll_interval_ms": 2000,
        "ingest_retry_max_seconds": 1.0,
        "database_ready_timeout": 10.0,
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
