"""Asynchronous Kafka publishing that never blocks its caller and loses nothing short of a full disk.

``publish()`` only enqueues. A background thread sends to Kafka and waits for the acknowledgements. While the broker
is unreachable, events go to an append-only spill file under ``<home>/spill/``; once it answers again the file is
replayed in order before new events are sent directly. Spill files left by processes that died are adopted and
replayed by the next publisher that starts. Past ``spill_max_bytes`` events are dropped, counted and logged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from tenacity import Retrying, retry_if_result, wait_fixed

from flywheel.events import Event
from flywheel.kafka import event_producer, reachable, send_and_wait
from flywheel.metrics import publisher_metrics
from flywheel.settings import Settings
from flywheel.spill import Backlog, Record

if TYPE_CHECKING:
    from kafka import KafkaProducer

logger = logging.getLogger(__name__)

#: Most events sent or replayed before waiting for their acknowledgements.
CHUNK = 1000
#: How often a connected publisher looks for spill files of dead processes, in seconds.
ORPHAN_SCAN_SECONDS = 30.0
#: Least time between two "dropping events" log lines, in seconds.
DROP_LOG_SECONDS = 60.0


class _StopWaitingError(Exception):
    """A closing publisher has nothing left to deliver, or no time left: stop waiting to reconnect."""


class PublisherState(StrEnum):
    """Where new events go."""

    STARTING = "starting"
    CONNECTED = "connected"
    SPILLING = "spilling"
    CLOSED = "closed"


@dataclass(frozen=True)
class PublisherStats:
    """Counters of one publisher since it started."""

    state: PublisherState
    sent: int
    spilled: int
    dropped: int
    queued: int
    spill_bytes: int


class EventPublisher:
    """Publishes any ``flywheel.events.Event`` to its topic without ever blocking the caller."""

    def __init__(self, settings: Settings, name: str = "events") -> None:
        self.settings = settings
        self.name = name
        self.directory = settings.home / "spill"
        self._queue: queue.Queue[Event] = queue.Queue(maxsize=settings.publish_queue_size)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._producer: KafkaProducer | None = None
        self._state = PublisherState.STARTING
        self._backlog = Backlog(self.directory, name, settings.spill_max_bytes)
        #: Records handed to the producer and not yet acknowledged or failed, by send number.
        self._pending: dict[int, Record] = {}
        self._sends = itertools.count()
        self._held: list[Record] = []
        self._sent = self._spilled = self._dropped = 0
        self._last_drop_log = 0.0
        self._drops_since_log = 0
        self._metrics = publisher_metrics()

    # Public API

    def start(self) -> EventPublisher:
        """Start the sending thread; adopt spill files of dead processes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"publisher-{self.name}", daemon=True)
        self._thread.start()
        return self

    def publish(self, event: Event) -> None:
        """Queue ``event`` for its topic; returns at once, spilling to disk if the queue is full."""
        if self._state is not PublisherState.CLOSED:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                pass
        self._spill([Record.of(event)])

    @property
    def state(self) -> PublisherState:
        """Where new events go right now."""
        return self._state

    def healthy(self) -> bool:
        """Whether events are being delivered or safely spilled."""
        thread_alive = self._thread is not None and self._thread.is_alive()
        return thread_alive and self._state in (PublisherState.CONNECTED, PublisherState.SPILLING)

    def stats(self) -> PublisherStats:
        """Counters since start."""
        return PublisherStats(
            state=self._state,
            sent=self._sent,
            spilled=self._spilled,
            dropped=self._dropped,
            queued=self._queue.qsize() + len(self._pending) + len(self._held),
            spill_bytes=self._backlog.pending,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (spilling what Kafka does not take within ``timeout``) and stop."""
        from kafka.errors import KafkaError

        if self._state is PublisherState.CLOSED:
            return
        self._close_deadline = time.monotonic() + timeout
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout + self.settings.kafka_timeout + 5)
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                self._producer.close(timeout=1)
            self._producer = None
        with self._lock:
            stranded = list(self._pending.values())
            self._pending.clear()
        leftovers = []
        while True:
            try:
                leftovers.append(Record.of(self._queue.get_nowait()))
            except queue.Empty:
                break
        self._set_state(PublisherState.CLOSED)
        # Sends Kafka never answered go to disk too; should one still arrive, replay duplicates it (by id).
        self._spill([*stranded, *self._held, *leftovers])
        self._held = []
        with self._lock:
            self._backlog.close()

    def __enter__(self) -> EventPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Background thread

    def _run(self) -> None:
        from kafka.errors import KafkaError

        self._adopt_orphans()
        next_scan = 0.0
        while True:
            if self._state is not PublisherState.CONNECTED and not self._pending:
                if self._held:
                    # Sends in flight at the outage have failed and been spilled; what waited goes after them.
                    self._spill(self._held)
                    self._held = []
                if not self._reconnect():
                    break
            closing = self._closing.is_set()
            # Mid-replay the next chunk goes at once; while sends of an outage are unsettled, waiting is enough.
            replaying = self._state is not PublisherState.CONNECTED and not self._pending
            events = self._take(timeout=0.0 if replaying else 0.05 if closing else 0.2)
            records = [Record.of(event) for event in events]
            if self._state is PublisherState.CONNECTED:
                # Connected implies an empty backlog: spilling or adopting a file switches the state first.
                self._send_async(records)
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
                    self._adopt_orphans()
            elif self._pending:
                self._held.extend(records)
            else:
                self._spill(records)
            if closing and self._queue.empty():
                if self._producer is not None and self._pending:
                    with contextlib.suppress(KafkaError):
                        self._producer.flush(timeout=max(0.0, self._close_deadline - time.monotonic()))
                if self._settled() or time.monotonic() > self._close_deadline:
                    break

    def _reconnect(self) -> bool:
        """Replay a chunk of the backlog, retrying every ``kafka_retry_interval``; False once a closing one gives up."""
        retrying = Retrying(
            retry=retry_if_result(lambda progressed: not progressed),
            wait=wait_fixed(self.settings.kafka_retry_interval),
            # Closing stops at the first failed attempt: what is left stays on disk for the next process.
            stop=lambda _: self._closing.is_set(),
            sleep=self._spill_while_waiting,
            retry_error_callback=lambda _: False,
        )
        try:
            return retrying(self._replay_step)
        except _StopWaitingError:
            return False

    def _spill_while_waiting(self, seconds: float) -> None:
        """The wait between reconnect attempts: new events go on disk meanwhile, behind the backlog."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            closing = self._closing.is_set()
            self._spill([Record.of(event) for event in self._take(timeout=min(remaining, 0.05 if closing else 0.2))])
            if closing and self._queue.empty() and (self._settled() or time.monotonic() > self._close_deadline):
                raise _StopWaitingError

    def _settled(self) -> bool:
        return not self._pending and not self._held and not self._backlog.has_pending()

    def _take(self, timeout: float) -> list[Event]:
        try:
            events = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(events) < CHUNK:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return events

    def _send_async(self, records: list[Record]) -> None:
        """Hand records to the producer; acknowledgements and failures arrive in callbacks."""
        from kafka.errors import KafkaError

        assert self._producer is not None
        for index, record in enumerate(records):
            try:
                future = self._producer.send(record.topic, value=record.payload, key=record.key)
            except KafkaError:
                # Metadata or buffer unavailable: the rest would wait max_block_ms each for nothing.
                self._outage()
                self._spill(records[index:])
                return
            number = next(self._sends)
            with self._lock:
                self._pending[number] = record
            future.add_callback(self._acknowledged, number)
            future.add_errback(self._failed, number)

    def _acknowledged(self, number: int, _: object) -> None:
        with self._lock:
            record = self._pending.pop(number, None)
            if record is None:
                return  # close() has spilled it already
            self._sent += 1
        self._metrics.events.labels(topic=record.topic, outcome="sent").inc()

    def _failed(self, number: int, _: BaseException) -> None:
        with self._lock:
            record = self._pending.get(number)
        if record is None:
            return
        self._outage()
        self._spill([record])
        with self._lock:
            # Removed only now, so the thread does not start replaying before this record is on disk.
            self._pending.pop(number, None)

    def _outage(self) -> None:
        if self._state is PublisherState.CONNECTED:
            logger.warning(
                "Kafka at %s is not acknowledging events; spilling them to %s until it is back",
                self.settings.kafka_bootstrap,
                self.directory,
            )
            self._set_state(PublisherState.SPILLING)

    def _send(self, records: list[Record]) -> list[bool]:
        """Send and wait for the acknowledgements; one flag per record."""
        assert self._producer is not None
        ok = send_and_wait(self._producer, records, timeout=self.settings.kafka_timeout + 5)
        sent = Counter(record.topic for record, flag in zip(records, ok, strict=True) if flag)
        self._metrics.count("sent", sent)
        with self._lock:
            self._sent += sum(sent.values())
        return ok

    def _replay_step(self) -> bool:
        """Deliver one chunk of the backlog; True when that worked (or there was none and Kafka is up)."""
        if not self._connect():
            if self._state is PublisherState.STARTING:
                logger.warning(
                    "Kafka at %s is unreachable; spilling events to %s until it is back",
                    self.settings.kafka_bootstrap,
                    self.directory,
                )
                self._set_state(PublisherState.SPILLING)
            return False
        with self._lock:
            if not self._backlog.has_pending():
                self._backlog.drained()
                if self._state is not PublisherState.CONNECTED:
                    logger.info("Kafka at %s is reachable; publishing directly", self.settings.kafka_bootstrap)
                self._set_state(PublisherState.CONNECTED)
                self._update_spill_gauge()
                return True
            source = self._backlog.next_source()
        assert source is not None
        todo, end = self._backlog.read(source, CHUNK)
        delivered = self._send([rec for _, rec in todo])
        if not all(delivered):
            self._backlog.delivered(source, [pos for (pos, _), ok in zip(todo, delivered, strict=True) if ok])
            self._drop_producer()
            return False
        with self._lock:
            self._backlog.replayed(source, end)
            self._update_spill_gauge()
        return True

    def _connect(self) -> bool:
        from kafka.errors import KafkaError

        if not reachable(self.settings.kafka_bootstrap):
            return False
        if self._producer is None:
            try:
                self._producer = event_producer(self.settings, client_id=f"flywheel-{self.name}")
            except KafkaError as exc:
                logger.warning("cannot connect to Kafka at %s: %s", self.settings.kafka_bootstrap, exc)
                return False
        return True

    def _drop_producer(self) -> None:
        # The broker answers but does not take events: start over with a fresh client on the next attempt.
        if self._producer is not None:
            self._producer.close(timeout=0)
            self._producer = None

    # Spill files

    def _spill(self, records: list[Record]) -> None:
        if not records:
            return
        with self._lock:
            spilled, dropped = self._backlog.append(records)
            if self._state is PublisherState.CONNECTED:
                self._state = PublisherState.SPILLING
            self._spilled += sum(spilled.values())
            self._update_spill_gauge()
        self._metrics.count("spilled", spilled)
        if dropped:
            self._count_drops(dropped)

    def _count_drops(self, dropped: dict[str, int]) -> None:
        self._metrics.count("dropped", dropped)
        with self._lock:
            self._dropped += sum(dropped.values())
            self._drops_since_log += sum(dropped.values())
            now = time.monotonic()
            if now - self._last_drop_log < DROP_LOG_SECONDS:
                return
            drops, self._drops_since_log, self._last_drop_log = self._drops_since_log, 0, now
        logger.error(
            "dropped %d events: the spill file reached its cap of %d bytes (FLYWHEEL_SPILL_MAX_BYTES) while "
            "Kafka at %s is unreachable",
            drops,
            self.settings.spill_max_bytes,
            self.settings.kafka_bootstrap,
        )

    def _adopt_orphans(self) -> None:
        found = self._backlog.find_orphans()
        if not found:
            return
        with self._lock:
            self._backlog.orphans.extend(found)
            if self._state is PublisherState.CONNECTED:
                self._state = PublisherState.SPILLING
            self._update_spill_gauge()

    def _update_spill_gauge(self) -> None:
        self._metrics.spill_bytes.set(self._backlog.pending)

    def _set_state(self, state: PublisherState) -> None:
        self._state = state
