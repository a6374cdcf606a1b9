"""Ingestion from a real broker into both databases: once per prediction, dead letters, outages, joins."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import func
from sqlalchemy.engine import make_url
from sqlmodel import select

from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.events import DeadLetterEvent, Topic, encode, new_id
from flywheel.models.feedback import FeedbackCreate, FeedbackStatus, Prediction
from tests.conftest import TcpProxy, read_topic, wait_until
from tests.feedback.conftest import prediction, produce, running_ingestor, stored_ids

pytestmark = pytest.mark.slow


def row_count(store: FeedbackStore) -> int:
    with store.database.read_session() as session:
        return int(session.exec(select(func.count()).select_from(Prediction)).one())


def test_replayed_events_create_no_duplicate_rows(
    store_factory: Callable[..., FeedbackStore], private_broker: EmbeddedBroker
) -> None:
    store = store_factory(kafka_bootstrap=private_broker.bootstrap)
    events = [prediction(f"review {i}", (i % 10) / 10 + 0.05) for i in range(120)]
    produce(private_broker.bootstrap, [encode(event) for event in events])
    with running_ingestor(store, group="first") as ingestor:
        wait_until(lambda: row_count(store) == 120, what="120 rows")
        # The producer retries a batch (same events again) while the consumer runs.
        produce(private_broker.bootstrap, [encode(event) for event in events[:40]])
        wait_until(lambda: ingestor.stats.received == 160, what="the re-sent events")
    # A new consumer group re-reads the whole log from the beginning.
    with running_ingestor(store, group="replay") as replay:
        wait_until(lambda: replay.stats.received == 160, what="the replay")
    assert sorted(stored_ids(store)) == sorted(event.prediction_id for event in events)
    assert (ingestor.stats.inserted, ingestor.stats.duplicates) == (120, 40)
    assert (replay.stats.inserted, replay.stats.duplicates) == (0, 160)


def test_malformed_events_go_to_the_dead_letter_topic_and_the_consumer_continues(
    store_factory: Callable[..., FeedbackStore], private_broker: EmbeddedBroker
) -> None:
    store = store_factory(kafka_bootstrap=private_broker.bootstrap)
    good = [prediction(f"fine text {i}", 0.7) for i in range(4)]
    too_long_id = prediction("id too long", 0.7, prediction_id="x" * 200)
    payloads = [
        encode(good[0]),
        b"{not json",
        encode(good[1]),
        b'{"prediction_id": "p1", "text": "no scores"}',
        encode(too_long_id),
        "ä \x00 binary".encode("latin-1"),
        encode(good[2]),
        encode(good[3]),
    ]
    with running_ingestor(store) as ingestor:
        produce(private_broker.bootstrap, payloads)
        wait_until(lambda: ingestor.stats.received == 8, what="all 8 events")
        wait_until(lambda: ingestor.stats.dead_lettered == 4, what="4 dead letters")
        assert ingestor.stats.inserted == 4
    assert sorted(stored_ids(store)) == sorted(event.prediction_id for event in good)
    letters = read_topic(private_broker.bootstrap, Topic.DLQ.value, lambda found: len(found) >= 4)
    assert all(isinstance(letter, DeadLetterEvent) for letter in letters)
    by_offset = {letter.offset: letter for letter in letters if isinstance(letter, DeadLetterEvent)}
    assert sorted(by_offset) == [1, 3, 4, 5]
    assert by_offset[1].payload == "{not json"
    assert "invalid PredictionEvent" in by_offset[3].error
    assert "prediction_id must be 1-64 characters" in by_offset[4].error
    assert by_offset[3].source_topic == Topic.PREDICTIONS.value


def test_database_outage_mid_stream_loses_and_duplicates_nothing(
    store_factory: Callable[..., FeedbackStore],
    private_broker: EmbeddedBroker,
    database_url: str,
    tcp_proxy: Callable[[tuple[str, int]], TcpProxy],
) -> None:
    outage: Callable[[], object]
    recovery: Callable[[], object]
    if database_url.startswith("postgresql"):
        url = make_url(database_url)
        proxy = tcp_proxy((url.host or "127.0.0.1", url.port or 5432))
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        consumer_store = store_factory(kafka_bootstrap=private_broker.bootstrap, database_url=proxied)
        outage, recovery = proxy.stop, proxy.start
    else:
        consumer_store = store_factory(kafka_bootstrap=private_broker.bootstrap)
        path = make_url(database_url).database or ""
        release = threading.Event()
        locked = threading.Event()

        def hold_lock() -> None:
            # Another process holding SQLite's write lock is how a SQLite store becomes unavailable.
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(60)
            connection.execute("COMMIT")
            connection.close()

        def stop_sqlite() -> None:
            threading.Thread(target=hold_lock, daemon=True).start()
            locked.wait(10)

        outage, recovery = stop_sqlite, release.set
    reader = store_factory()
    waves = [[prediction(f"wave {w} item {i}", 0.6) for i in range(100)] for w in range(3)]
    with running_ingestor(consumer_store) as ingestor:
        produce(private_broker.bootstrap, [encode(event) for event in waves[0]])
        wait_until(lambda: row_count(reader) == 100, what="the first wave")
        outage()
        produce(private_broker.bootstrap, [encode(event) for event in waves[1]])
        wait_until(lambda: ingestor.stats.retries >= 2, what="retries while the database is down")
        assert row_count(reader) == 100
        recovery()
        produce(private_broker.bootstrap, [encode(event) for event in waves[2]])
        wait_until(lambda: row_count(reader) == 300, timeout=60, what="all 300 rows")
        wait_until(lambda: ingestor.stats.received >= 300, what="all events received")
    assert sorted(stored_ids(reader)) == sorted(event.prediction_id for wave in waves for event in wave)
    assert ingestor.stats.dead_lettered == 0


def test_consumer_joins_early_feedback_and_rejects_orphans_after_the_grace_period(
    store_factory: Callable[..., FeedbackStore], private_broker: EmbeddedBroker
) -> None:
    store = store_factory(kafka_bootstrap=private_broker.bootstrap, feedback_grace_seconds=2)
    late = prediction("a delightful surprise", 0.9)
    early = store.submit(FeedbackCreate(prediction_id=late.prediction_id, label="positive"), principal="web")
    orphan = store.submit(FeedbackCreate(prediction_id=new_id(), label="positive"), principal="web")
    with running_ingestor(store) as ingestor:
        produce(private_broker.bootstrap, [encode(late)])
        wait_until(lambda: store.get(early.feedback_id).text is not None, what="the join")
        wait_until(lambda: store.get(orphan.feedback_id).status == FeedbackStatus.REJECTED, what="the expiry")
        assert ingestor.stats.joined == 1
    joined = store.get(early.feedback_id)
    assert joined.status == FeedbackStatus.ACCEPTED and joined.text == "a delightful surprise"
    assert "grace period" in (store.get(orphan.feedback_id).status_reason or "")
