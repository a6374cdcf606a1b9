"""The prediction-log consumer: ``flywheel.predictions`` into the store, at least once, each row once.

Offsets are committed only after the database transaction holding the batch committed, so a crash
re-delivers events instead of losing them, and the upsert on ``prediction_id`` makes re-delivery
harmless. Events that can never be stored go to ``flywheel.dlq`` with the error. When the database
(or, for dead letters, the broker) is unreachable the consumer pauses its partitions, keeps polling
so it stays in the group, and retries the same batch with backoff until it succeeds. Any other failure
(a schema changed under it, a bug) closes the consumer; it is supervised (``flywheel.supervision``), so a
fresh one starts after a backoff and is re-delivered the uncommitted batch. Both kinds of fault show in
``flywheel_thread_up{thread="ingest"}`` and ``flywheel_thread_faults_total`` until batches go through again.
Stored rows are then offered to the drift embedder (``flywheel.embedding``), a thread of its own that embeds them
once for drift reports; ingestion never waits for it, and its failures cost no prediction.

Shadow predictions (``PredictionEvent.shadow``) go to their own table, ``shadow_prediction``, in the same batch and
with the same guarantees: drift windows, label shares and the review queue read ``prediction`` and never see them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry, Counter, start_http_server
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from feedback.prediction_rows import InvalidPredictionError, prediction_row, shadow_row
from feedback.store import FeedbackStore
from feedback.vetting import insert_for
from flywheel.embedding import PredictionEmbedder
from flywheel.errors import FlywheelError
from flywheel.events import DeadLetterEvent, EventDecodeError, PredictionEvent, Topic, decode, encode, utcnow
from flywheel.kafka import kafka_consumer, kafka_producer
from flywheel.models.deployment import ShadowPrediction
from flywheel.retry import failure
from flywheel.settings import Settings
from flywheel.supervision import Supervised, describe

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Failures that go away when the database or broker comes back: pause and retry.
TRANSIENT_ERRORS = (OperationalError, InterfaceError, KafkaError)
#: Failures of one row that no retry will fix: the event goes to the dead-letter topic.
ROW_ERRORS = (DataError, IntegrityError)
MAX_DEAD_LETTER_PAYLOAD = 100_000


class IngestError(FlywheelError):
    """The ingest consumer cannot run."""


class StoppedError(Exception):
    """Stop was requested while a batch was still waiting to be written; it will be re-delivered."""


@dataclass
class IngestStats:
    """Running totals of one ingestor."""

    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    joined: int = 0
    #: Shadow predictions written to their table (a re-delivered one is counted again, stored once).
    shadowed: int = 0
    dead_lettered: int = 0
    retries: int = 0
    batches: int = 0
    last_error: str | None = None


@dataclass
class _Batch:
    rows: list[dict[str, Any]] = field(default_factory=list)
    origins: list[tuple[TopicPartition, int, bytes]] = field(default_factory=list)
    shadows: list[dict[str, Any]] = field(default_factory=list)
    shadow_origins: list[tuple[TopicPartition, int, bytes]] = field(default_factory=list)
    dead: list[DeadLetterEvent] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)


class _Assignments(ConsumerRebalanceListener):
    def __init__(self, assigned: threading.Event) -> None:
        self.assigned = assigned

    def on_partitions_revoked(self, revoked: Any) -> None:
        logger.info("partitions revoked: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        logger.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        self.assigned.set()


class PredictionIngestor:
    """A consumer-group member that upserts prediction events into the feedback store."""

    def __init__(self, settings: Settings, store: FeedbackStore, group_id: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.group_id = group_id or settings.ingest_group_id
        self.stats = IngestStats()
        #: Set once the group assigned this consumer its partitions.
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self.registry = CollectorRegistry()
        self._events = Counter(
            "flywheel_ingest_events", "Prediction events by outcome.", ["outcome"], registry=self.registry
        )
        self._retries = Counter(
            "flywheel_ingest_retries", "Retries while the database or broker was unreachable.", registry=self.registry
        )
        self._sweep_interval = min(max(settings.feedback_grace_seconds / 4, 0.5), 60.0)
        #: Runs one consumer at a time until stop(), starting a fresh one after any unexpected failure.
        self.supervisor = Supervised(
            "ingest", self._consume, self._stop, max_backoff=settings.ingest_retry_max_seconds, registry=self.registry
        )
        self._connection: tuple[KafkaConsumer, KafkaProducer] | None = None
        #: Embeds stored predictions for drift reports; health and counters on this ingestor's registry.
        self.embedder = (
            PredictionEmbedder(settings, store.database, self._stop, registry=self.registry)
            if settings.drift_embed_at_ingest
            else None
        )

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in hand."""
        self._stop.set()

    def run(self) -> IngestStats:
        """Consume until ``stop()``; returns the totals. Only an unreachable broker at the start raises."""
        settings = self.settings
        try:
            self._connection = self._connect()
        except KafkaError as exc:
            raise IngestError(
                f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc}): start it or set FLYWHEEL_KAFKA_BOOTSTRAP"
            ) from exc
        metrics = None
        if settings.ingest_metrics_port:
            metrics, _ = start_http_server(settings.ingest_metrics_port, registry=self.registry)
        logger.info("ingesting %s into %s as group %r", Topic.PREDICTIONS.value, self.store.database.display_url,
                    self.group_id)
        self.supervisor.start()
        if self.embedder is not None:
            self.embedder.start()
        try:
            # Joined in steps, so signal handlers of the calling (main) thread run meanwhile.
            while self.supervisor.alive():
                self.supervisor.join(0.5)
        finally:
            if self.embedder is not None:
                # It stops after the batch in hand; what it leaves unembedded the next sweep or report embeds.
                self.embedder.supervisor.join(10)
            if metrics is not None:
                metrics.shutdown()
            logger.info("ingest stopped: %s", self.stats)
        return self.stats

    def _consume(self) -> None:
        """One consumer's life: poll and store until ``stop()``; should it raise, the supervisor starts a fresh one."""
        consumer, producer = self._connection or self._connect()
        self._connection = None
        try:
            consumer.subscribe([Topic.PREDICTIONS.value], listener=_Assignments(self.assigned))
            last_sweep = 0.0
            while not self._stop.is_set():
                records = consumer.poll(timeout_ms=500)
                if records:
                    try:
                        self._handle(consumer, producer, records)
                    except StoppedError:
                        break
                    self.supervisor.recovered()
                if time.monotonic() - last_sweep >= self._sweep_interval:
                    last_sweep = time.monotonic()
                    try:
                        self.store.expire_orphans()
                    except TRANSIENT_ERRORS as exc:
                        logger.warning("cannot expire orphaned feedback now: %s", exc)
        except Exception as exc:
            self.stats.last_error = describe(exc)
            raise
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=5)

    def _connect(self) -> tuple[KafkaConsumer, KafkaProducer]:
        consumer = kafka_consumer(
            self.settings,
            group_id=self.group_id,
            client_id=f"flywheel-ingest-{socket.gethostname()}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.settings.ingest_batch_size,
        )
        # Short blocking limits: while the broker is away the retry loop, not send(), should do the waiting.
        producer = kafka_producer(self.settings, acks="all", linger_ms=5, max_block_ms=3000)
        return consumer, producer

    def _handle(self, consumer: KafkaConsumer, producer: KafkaProducer, records: dict[Any, list[Any]]) -> None:
        batch = self._decode(records)
        if batch.rows:
            self._with_retry(consumer, lambda: self._write(batch))
        if batch.shadows:
            self._with_retry(consumer, lambda: self._write_shadows(batch))
        if batch.dead:
            self._with_retry(consumer, lambda: self._dead_letter(producer, batch.dead))
        offsets = {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in batch.offsets.items()}
        try:
            consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The rows are committed: a later commit or a re-delivery (harmless upserts) covers these offsets.
            logger.warning("offset commit failed, events may be re-delivered: %s", exc)
        self.stats.batches += 1

    def _decode(self, records: dict[Any, list[Any]]) -> _Batch:
        batch = _Batch()
        now = utcnow()
        for tp, messages in records.items():
            for message in messages:
                batch.offsets[tp] = max(batch.offsets.get(tp, -1), message.offset)
                self.stats.received += 1
                payload = message.value or b""
                try:
                    event = decode(Topic.PREDICTIONS, payload)
                    if not isinstance(event, PredictionEvent):
                        raise EventDecodeError(f"expected a PredictionEvent, got {type(event).__name__}")
                    if event.shadow is not None:
                        batch.shadows.append(shadow_row(event, now))
                        batch.shadow_origins.append((tp, message.offset, payload))
                        continue
                    batch.rows.append(prediction_row(event, now))
                    batch.origins.append((tp, message.offset, payload))
                except (EventDecodeError, InvalidPredictionError) as exc:
                    batch.dead.append(self._letter(tp, message.offset, payload, str(exc)))
        return batch

    def _write(self, batch: _Batch) -> None:
        rejected: list[DeadLetterEvent] = []
        stored = batch.rows
        try:
            results = [self.store.ingest(batch.rows)]
        except ROW_ERRORS as exc:
            logger.warning("batch rejected by the database (%s); writing its events one by one", exc.orig)
            results = []
            stored = []
            for row, (tp, offset, payload) in zip(batch.rows, batch.origins, strict=True):
                try:
                    results.append(self.store.ingest([row]))
                    stored.append(row)
                except ROW_ERRORS as row_exc:
                    rejected.append(self._letter(tp, offset, payload, f"database rejected it: {row_exc.orig}"))
        batch.dead.extend(rejected)
        if self.embedder is not None:
            self.embedder.offer(stored)
        inserted = sum(result.inserted for result in results)
        duplicates = len(batch.rows) - len(rejected) - inserted
        self.stats.inserted += inserted
        self.stats.duplicates += duplicates
        self.stats.joined += sum(result.joined for result in results)
        self._events.labels("inserted").inc(inserted)
        self._events.labels("duplicate").inc(duplicates)

    def _write_shadows(self, batch: _Batch) -> None:
        """Insert the batch's shadow rows (re-deliveries ignored); one by one when the database refuses the lot."""

        def insert(rows: list[dict[str, Any]]) -> None:
            with self.store.database.session() as session:
                statement = insert_for(session)(ShadowPrediction).on_conflict_do_nothing(
                    index_elements=["prediction_id", "deployment_id"]
                )
                session.connection().execute(statement, rows)

        stored = len(batch.shadows)
        try:
            insert(batch.shadows)
        except ROW_ERRORS as exc:
            logger.warning("shadow rows rejected by the database (%s); writing them one by one", exc.orig)
            for row, (tp, offset, payload) in zip(batch.shadows, batch.shadow_origins, strict=True):
                try:
                    insert([row])
                except ROW_ERRORS as row_exc:
                    stored -= 1
                    batch.dead.append(self._letter(tp, offset, payload, f"database rejected it: {row_exc.orig}"))
        self.stats.shadowed += stored
        self._events.labels("shadow").inc(stored)

    def _dead_letter(self, producer: KafkaProducer, letters: list[DeadLetterEvent]) -> None:
        futures = [producer.send(Topic.DLQ.value, value=encode(letter)) for letter in letters]
        producer.flush(timeout=5)
        for future in futures:
            future.get(timeout=1)
        self.stats.dead_lettered += len(letters)
        self._events.labels("dead_letter").inc(len(letters))
        for letter in letters:
            logger.warning(
                "dead-lettered %s[%d]@%d: %s", letter.source_topic, letter.partition, letter.offset, letter.error
            )

    @staticmethod
    def _letter(tp: TopicPartition, offset: int, payload: bytes, error: str) -> DeadLetterEvent:
        return DeadLetterEvent(
            source_topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            error=error,
            payload=payload[:MAX_DEAD_LETTER_PAYLOAD].decode("utf-8", errors="replace"),
        )

    def _with_retry(self, consumer: KafkaConsumer, action: Callable[[], T]) -> T:
        """Run ``action`` until it succeeds, pausing consumption while it fails transiently."""

        def failed(state: RetryCallState) -> None:
            exc = failure(state)
            self.stats.retries += 1
            self.stats.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._retries.inc()
            if state.attempt_number == 1:
                logger.warning("pausing consumption, retrying the batch in hand: %s", self.stats.last_error)
                consumer.pause(*consumer.assignment())
            self.supervisor.fault(f"retrying a batch: {self.stats.last_error}")

        retrying = Retrying(
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
            # 0.2 s, doubling up to ingest_retry_max_seconds, until it works or stop() is called.
            wait=wait_exponential(multiplier=0.2, max=self.settings.ingest_retry_max_seconds),
            # Waiting means polling, so the group keeps this member; it raises StoppedError on stop().
            sleep=lambda seconds: self._idle(consumer, seconds),
            before_sleep=failed,
        )
        result = retrying(action)
        if retrying.statistics["attempt_number"] > 1:
            logger.info("resuming consumption after %d retries", self.stats.retries)
            consumer.resume(*consumer.paused())
        return result

    def _idle(self, consumer: KafkaConsumer, seconds: float) -> None:
        """Wait while polling, so the group keeps this member; records of newly assigned partitions are put back."""
        deadline = time.monotonic() + seconds
        while True:
            if self._stop.is_set():
                raise StoppedError
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            records = consumer.poll(timeout_ms=int(min(remaining, 0.5) * 1000) or 1)
            for tp, messages in records.items():
                # A rebalance handed us a partition that is not paused yet: rewind it and pause it too.
                consumer.seek(tp, min(m.offset for m in messages))
                consumer.pause(tp)
