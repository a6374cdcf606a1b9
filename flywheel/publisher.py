"""Asynchronous Kafka publishing that never blocks its caller and loses nothing short of a full disk.

``publish()`` only enqueues. A background thread sends to Kafka and waits for the acknowledgements. While the broker
is unreachable, events go to an append-only spill file under ``<home>/spill/`` (group-committed: on stable storage
within ``spill_fsync_ms``); once it answers again the file is replayed in order before new events are sent directly.
Spill files of processes that died are adopted and replayed. Past ``spill_max_bytes`` events are dropped and counted.

At most ``publish_queue_size`` events live only in memory (queued, in flight to Kafka, or in the thread's hands);
beyond that ``publish()`` writes to the spill file itself. When the disk refuses a spill (full), the thread keeps
those events, shows the fault (``health()``, ``/readyz``), retries, and sends them to Kafka should it come back first.
The thread is supervised (``flywheel.supervision``): an exception restarts it after a backoff, with what it held.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from tenacity import Retrying, retry_if_result, wait_fixed

from flywheel.events import Event
from flywheel.kafka import event_producer, reachable, send_and_wait
from flywheel.outbox import Outbox
from flywheel.settings import Settings
from flywheel.spill import Record
from flywheel.supervision import Health, Supervised, describe

if TYPE_CHECKING:
    from kafka import KafkaProducer

logger = logging.getLogger(__name__)

#: Most events sent or replayed before waiting for their acknowledgements; also the most the thread takes in hand.
CHUNK = 1000
#: How often a connected publisher looks for spill files of dead processes, in seconds.
ORPHAN_SCAN_SECONDS = 30.0


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
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        #: One permit per event that may live only in memory: taken by publish(), returned once Kafka acknowledged
        #: the event or it is on disk (or dropped).
        self._room = threading.Semaphore(settings.publish_queue_size)
        self._outbox = Outbox(settings, name)
        self._lock = self._outbox.lock
        self._closing = threading.Event()
        self._close_deadline = 0.0
        self._thread = Supervised(f"publisher-{name}", self._deliver, self._closing)
        self._producer: KafkaProducer | None = None
        self._state = PublisherState.STARTING
        #: Records handed to the producer and not yet acknowledged or failed, by send number.
        self._pending: dict[int, Record] = {}
        self._sends = itertools.count()
        #: Taken from the queue, neither handed to Kafka nor on disk yet, oldest first; only the thread touches it.
        self._held: deque[Record] = deque()
        #: Sends Kafka failed (older than ``_held``), put here by the producer's callbacks for the thread to store.
        self._returned: list[Record] = []
        self._disk_refuses = False

    # Public API

    def start(self) -> EventPublisher:
        """Start the sending thread; adopt spill files of dead processes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def publish(self, event: Event) -> None:
        """Queue ``event`` for its topic; returns at once, writing it to the spill file if memory is full."""
        if self._state is not PublisherState.CLOSED and self._room.acquire(blocking=False):
            self._queue.put(event)
            return
        record = Record.of(event)
        try:
            self._spill([record])
        except OSError as exc:
            self._outbox.drop_records([record], f"memory is full and the spill file cannot be written ({exc})")

    @property
    def state(self) -> PublisherState:
        """Where new events go right now."""
        return self._state

    def health(self) -> Health:
        """Whether events are being delivered or safely spilled, and a line saying how, or what is wrong."""
        thread = self._thread.health()
        if self._state is PublisherState.CLOSED or (thread.up and self._state is PublisherState.STARTING):
            return Health(False, str(self._state), thread.faults)
        if not thread.up:
            return Health(False, thread.detail, thread.faults)
        if self._state is PublisherState.CONNECTED:
            return Health(True, "events reach Kafka", thread.faults)
        if (sync_fault := self._outbox.sync_fault()) is not None:
            return Health(False, f"Kafka unreachable, spills not on stable storage: {sync_fault}", thread.faults)
        return Health(True, "Kafka unreachable: events are spilled to disk and replayed later", thread.faults)

    def healthy(self) -> bool:
        """Whether events are being delivered or safely spilled."""
        return self.health().up

    def stats(self) -> PublisherStats:
        """Counters since start."""
        return PublisherStats(
            state=self._state,
            sent=self._outbox.sent,
            spilled=self._outbox.spilled,
            dropped=self._outbox.dropped,
            queued=self._queue.qsize() + len(self._pending) + len(self._held) + len(self._returned),
            spill_bytes=self._outbox.pending_bytes,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (spilling what Kafka does not take within ``timeout``) and stop."""
        from kafka.errors import KafkaError

        if self._state is PublisherState.CLOSED:
            return
        self._close_deadline = time.monotonic() + timeout
        self._closing.set()
        self._thread.join(timeout + self.settings.kafka_timeout + 5)
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                self._producer.close(timeout=1)
            self._producer = None
        with self._lock:
            # Sends Kafka never answered go to disk too; should one still arrive, replay duplicates it (by id).
            records = [*self._returned, *self._pending.values(), *self._held]
            self._pending.clear()
            self._returned = []
        self._held.clear()
        while True:
            try:
                records.append(Record.of(self._queue.get_nowait()))
            except queue.Empty:
                break
        self._state = PublisherState.CLOSED
        try:
            self._spill(records)
        except OSError as exc:
            self._outbox.drop_records(records, f"the spill file cannot be written at close ({exc})")
        self._outbox.close()

    def __enter__(self) -> EventPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Background thread

    def _deliver(self) -> None:
        """The thread's work, restarted by its supervisor should it raise; returns once closing is done."""
        from kafka.errors import KafkaError

        self._adopt_orphans()
        next_scan = 0.0
        while True:
            if self._state is not PublisherState.CONNECTED and not self._pending:
                # Sends in flight at the outage have failed and come back; they go to disk before what waited.
                self._store_in_hand()
                if not self._reconnect():
                    return
            closing = self._closing.is_set()
            # Mid-replay the next chunk goes at once; while sends of an outage are unsettled, waiting is enough.
            replaying = self._state is not PublisherState.CONNECTED and not self._pending
            self._take(timeout=0.0 if replaying else 0.05 if closing else 0.2)
            if self._state is PublisherState.CONNECTED:
                # Connected implies an empty backlog: spilling or adopting a file switches the state first.
                self._send_in_hand()
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + ORPHAN_SCAN_SECONDS
                    self._adopt_orphans()
            elif not self._pending:
                self._store_in_hand()
            if closing and self._queue.empty():
                if self._producer is not None and self._pending:
                    with contextlib.suppress(KafkaError):
                        self._producer.flush(timeout=max(0.0, self._close_deadline - time.monotonic()))
                if self._settled() or time.monotonic() > self._close_deadline:
                    return

    def _take(self, timeout: float) -> None:
        """Move up to a chunk of queued events into the thread's hands, waiting up to ``timeout`` for the first."""
        room = CHUNK - len(self._held)
        if room <= 0:
            # Neither the disk nor Kafka takes them: hold no more; the queue and publish() bound the rest.
            time.sleep(max(timeout, 0.01))
            return
        try:
            events = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return
        while len(events) < room:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._held.extend(Record.of(event) for event in events)

    def _store_in_hand(self) -> None:
        """Write the failed sends, then the held events, to the spill file; the disk refusing, keep them in hand."""
        with self._lock:
            returned, self._returned = self._returned, []
        self._held.extendleft(reversed(returned))
        if self._held:
            records = list(self._held)
            try:
                self._spill(records)
            except OSError as exc:
                self._disk_refused(exc)
                return
            self._held.clear()
            self._room.release(len(records))
            self._disk_refuses = False
        self._thread.recovered()

    def _disk_refused(self, error: OSError) -> None:
        detail = (
            f"Kafka unreachable and the spill file cannot be written ({describe(error)}): "
            f"{len(self._held) + self._queue.qsize()} events held in memory until the disk or Kafka takes them"
        )
        if not self._disk_refuses:
            self._disk_refuses = True
            logger.error("%s; free space under %s (events beyond FLYWHEEL_PUBLISH_QUEUE_SIZE are dropped)",
                         detail, self.directory)
        self._thread.fault(detail)

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
            self._take(timeout=min(remaining, 0.05 if closing else 0.2))
            self._store_in_hand()
            if closing and self._queue.empty() and (self._settled() or time.monotonic() > self._close_deadline):
                raise _StopWaitingError

    def _settled(self) -> bool:
        return not (self._pending or self._held or self._returned or self._outbox.has_pending())

    def _send_in_hand(self) -> None:
        """Hand the held records to the producer, oldest first; acknowledgements and failures arrive in callbacks."""
        from kafka.errors import KafkaError

        assert self._producer is not None
        with self._lock:
            returned, self._returned = self._returned, []
        self._held.extendleft(reversed(returned))
        while self._held:
            record = self._held[0]
            try:
                future = self._producer.send(record.topic, value=record.payload, key=record.key)
            except KafkaError:
                # Metadata or buffer unavailable: the rest would wait max_block_ms each for nothing; they go to disk.
                self._outage()
                return
            number = next(self._sends)
            with self._lock:
                self._pending[number] = record
            self._held.popleft()
            future.add_callback(self._acknowledged, number)
            future.add_errback(self._failed, number)
        self._thread.recovered()

    def _acknowledged(self, number: int, _: object) -> None:
        with self._lock:
            record = self._pending.pop(number, None)
        if record is None:
            return  # close() has spilled it already
        self._room.release()
        self._outbox.count_sent({record.topic: 1})

    def _failed(self, number: int, _: BaseException) -> None:
        # Runs on the producer's thread, which must not wait on a disk: the publisher's thread stores the record.
        with self._lock:
            record = self._pending.pop(number, None)
            if record is None:
                return
            self._returned.append(record)
        self._outage()

    def _outage(self) -> None:
        if self._state is PublisherState.CONNECTED:
            logger.warning(
                "Kafka at %s is not acknowledging events; spilling them to %s until it is back",
                self.settings.kafka_bootstrap,
                self.directory,
            )
            self._state = PublisherState.SPILLING

    def _send(self, records: list[Record]) -> list[bool]:
        """Send and wait for the acknowledgements; one flag per record."""
        assert self._producer is not None
        ok = send_and_wait(self._producer, records, timeout=self.settings.kafka_timeout + 5)
        self._outbox.count_sent(Counter(record.topic for record, flag in zip(records, ok, strict=True) if flag))
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
                self._state = PublisherState.SPILLING
            return False
        if not self._outbox.replay_chunk(CHUNK, self._send, self._now_connected):
            # The broker answers but does not take events: start over with a fresh client on the next attempt.
            if self._producer is not None:
                self._producer.close(timeout=0)
                self._producer = None
            return False
        return True

    def _now_connected(self) -> None:
        if self._state is not PublisherState.CONNECTED:
            logger.info("Kafka at %s is reachable; publishing directly", self.settings.kafka_bootstrap)
        self._state = PublisherState.CONNECTED

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

    def _spill(self, records: list[Record]) -> None:
        """Put ``records`` on disk (raising ``OSError`` if it refuses); new events then go there until replayed."""
        self._outbox.spill(records, self._leave_connected)

    def _adopt_orphans(self) -> None:
        self._outbox.adopt_orphans(self._leave_connected)

    def _leave_connected(self) -> None:
        if self._state is PublisherState.CONNECTED:
            self._state = PublisherState.SPILLING
