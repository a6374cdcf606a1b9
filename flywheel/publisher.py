"""Asynchronous Kafka publishing that never blocks its caller and loses nothing short of a full disk.

``publish()`` only enqueues. A background thread sends to Kafka and waits for the acknowledgements. While the broker
is unreachable, events go to an append-only spill file under ``<home>/spill/``; once it answers again the file is
replayed in order before new events are sent directly. Spill files left by processes that died are adopted and
replayed by the next publisher that starts. Past ``spill_max_bytes`` events are dropped, counted and logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.events import Event, Topic, encode, new_id
from flywheel.settings import Settings
from flywheel.storage import atomic_write_text

if TYPE_CHECKING:
    from kafka import KafkaProducer

logger = logging.getLogger(__name__)

#: Most events sent or replayed before waiting for their acknowledgements.
CHUNK = 1000
#: How often a connected publisher looks for spill files of dead processes, in seconds.
ORPHAN_SCAN_SECONDS = 30.0
#: Least time between two "dropping events" log lines, in seconds.
DROP_LOG_SECONDS = 60.0


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


@dataclass(frozen=True)
class _Record:
    """One encoded event as sent to Kafka or stored in a spill file line."""

    topic: str
    key: bytes | None
    payload: bytes

    def line(self) -> bytes:
        # Tab-separated; the JSON payload never contains a raw tab or newline.
        return b"%s\t%s\t%s\n" % (self.topic.encode(), (self.key or b"").hex().encode(), self.payload)

    @classmethod
    def parse(cls, line: bytes) -> _Record:
        topic, key, payload = line.split(b"\t", 2)
        return cls(Topic(topic.decode()).value, bytes.fromhex(key.decode()) or None, payload)

    @classmethod
    def of(cls, event: Event) -> _Record:
        return cls(event.topic.value, event.key(), encode(event))


@dataclass(frozen=True)
class _PublisherMetrics:
    events: Any
    spill_bytes: Any


@functools.cache
def _metrics() -> _PublisherMetrics:
    # Created on first use, once per process: prometheus_client must see PROMETHEUS_MULTIPROC_DIR first.
    from prometheus_client import Counter, Gauge

    events = Counter(
        "flywheel_kafka_events",
        "Events by topic and outcome: sent (acknowledged by Kafka), spilled (written to disk), dropped.",
        ["topic", "outcome"],
    )
    for topic in Topic:
        for outcome in ("sent", "spilled", "dropped"):
            # Export zeros from the start, so rate() and alerts see a series before the first failure.
            events.labels(topic=topic.value, outcome=outcome)
    return _PublisherMetrics(
        events=events,
        spill_bytes=Gauge(
            "flywheel_kafka_spill_bytes", "Bytes waiting in spill files for replay.", multiprocess_mode="livesum"
        ),
    )


class SpillFile:
    """An append-only file of events plus how far it has been replayed; an exclusive lock marks its owner alive."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.size = os.fstat(fd).st_size
        self.offset = self._read_offset()

    @classmethod
    def create(cls, directory: Path, prefix: str) -> SpillFile:
        """A new locked spill file; it only gets its final name once locked, so nobody adopts it by mistake."""
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{prefix}-{new_id()}.spill"
        tmp = directory / f".{name}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, directory / name)
        return cls(directory / name, fd)

    @classmethod
    def adopt(cls, path: Path) -> SpillFile | None:
        """Take over the spill file of a process that died; None while its owner still holds the lock."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not path.exists():
            # Another process adopted, replayed and removed it between our open and lock.
            os.close(fd)
            return None
        return cls(path, fd)

    @property
    def _offset_path(self) -> Path:
        return self.path.with_name(self.path.name + ".offset")

    def _read_offset(self) -> int:
        try:
            return min(int(self._offset_path.read_text()), self.size)
        except (FileNotFoundError, ValueError):
            return 0

    @property
    def pending(self) -> int:
        """Bytes not yet replayed."""
        return self.size - self.offset

    def append(self, data: bytes) -> None:
        """Append whole lines."""
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)

    def read(self, max_records: int) -> tuple[list[tuple[int, _Record]], int, int]:
        """Up to ``max_records`` records from the replay offset: (line offset, record) pairs, end offset, bad lines."""
        size = 1 << 20
        while True:
            data = os.pread(self._fd, size, self.offset)
            end = data.rfind(b"\n")
            if end >= 0 or len(data) < size:
                break
            size *= 2
        records: list[tuple[int, _Record]] = []
        bad = 0
        position = self.offset
        for line in data[: end + 1].splitlines(keepends=True):
            if len(records) == max_records:
                break
            try:
                records.append((position, _Record.parse(line.rstrip(b"\n"))))
            except ValueError:
                bad += 1
            position += len(line)
        if end < 0 and data and self.offset + len(data) == self.size:
            # A torn last line, from a process killed mid-write: nothing can be recovered from it.
            bad += 1
            position = self.size
        return records, position, bad

    def advance(self, offset: int) -> None:
        """Mark everything before ``offset`` as delivered, durably."""
        self.offset = offset
        atomic_write_text(self._offset_path, str(offset))

    def reset(self) -> None:
        """Empty the fully replayed file so it can take new events."""
        os.ftruncate(self._fd, 0)
        self.size = self.offset = 0
        self._offset_path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the file and release it."""
        self.path.unlink(missing_ok=True)
        self._offset_path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Release the lock, leaving the file for another process to adopt."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


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
        self._own: SpillFile | None = None
        self._orphans: list[SpillFile] = []
        self._delivered: set[tuple[str, int]] = set()
        #: Records handed to the producer and not yet acknowledged or failed, by send number.
        self._pending: dict[int, _Record] = {}
        self._sends = itertools.count()
        self._held: list[_Record] = []
        self._sent = self._spilled = self._dropped = 0
        self._last_drop_log = 0.0
        self._drops_since_log = 0
        self._metrics = _metrics()

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
        self._spill([_Record.of(event)])

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
            spill_bytes=self._backlog_bytes(),
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
                leftovers.append(_Record.of(self._queue.get_nowait()))
            except queue.Empty:
                break
        self._set_state(PublisherState.CLOSED)
        # Sends Kafka never answered go to disk too; should one still arrive, replay duplicates it (by id).
        self._spill([*stranded, *self._held, *leftovers])
        self._held = []
        with self._lock:
            for spill in [*self._orphans, *([self._own] if self._own else [])]:
                if spill.pending == 0:
                    spill.remove()
                else:
                    spill.close()
            self._orphans.clear()
            self._own = None

    def __enter__(self) -> EventPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Background thread

    def _run(self) -> None:
        from kafka.errors import KafkaError

        self._adopt_orphans()
        next_attempt = next_scan = 0.0
        while True:
            closing = self._closing.is_set()
            if self._state is not PublisherState.CONNECTED and not self._pending:
                if self._held:
                    # Sends in flight at the outage have failed and been spilled; what waited goes after them.
                    self._spill(self._held)
                    self._held = []
                if time.monotonic() >= next_attempt:
                    progressed = self._replay_step()
                    next_attempt = 0.0 if progressed else time.monotonic() + self.settings.kafka_retry_interval
                    if not progressed and closing:
                        break
            replaying = self._state is not PublisherState.CONNECTED and next_attempt == 0.0
            events = self._take(timeout=0.0 if replaying else 0.05 if closing else 0.2)
            records = [_Record.of(event) for event in events]
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
                settled = not self._pending and not self._held and not self._has_backlog()
                if settled or time.monotonic() > self._close_deadline:
                    break

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

    def _send_async(self, records: list[_Record]) -> None:
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

    def _send(self, records: list[_Record]) -> list[bool]:
        """Send and wait for the acknowledgements; one flag per record."""
        from kafka.errors import KafkaError

        assert self._producer is not None
        futures = []
        for record in records:
            try:
                futures.append(self._producer.send(record.topic, value=record.payload, key=record.key))
            except KafkaError:
                break
        with contextlib.suppress(KafkaError):
            self._producer.flush(timeout=self.settings.kafka_timeout + 5)
        ok = [future.is_done and future.succeeded() for future in futures]
        ok += [False] * (len(records) - len(ok))
        counts: dict[str, int] = {}
        for record, flag in zip(records, ok, strict=True):
            if flag:
                counts[record.topic] = counts.get(record.topic, 0) + 1
        for topic, count in counts.items():
            self._metrics.events.labels(topic=topic, outcome="sent").inc(count)
            with self._lock:
                self._sent += count
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
            if not self._has_backlog():
                if self._own is not None and self._own.size:
                    self._own.reset()
                if self._state is not PublisherState.CONNECTED:
                    logger.info("Kafka at %s is reachable; publishing directly", self.settings.kafka_bootstrap)
                self._set_state(PublisherState.CONNECTED)
                self._update_spill_gauge()
                return True
            source = self._orphans[0] if self._orphans else self._own
        assert source is not None
        lines, end, bad = source.read(CHUNK)
        if bad:
            logger.warning("skipped %d unreadable lines in %s", bad, source.path)
        todo = [(pos, rec) for pos, rec in lines if (str(source.path), pos) not in self._delivered]
        delivered = self._send([rec for _, rec in todo])
        if not all(delivered):
            # Remember what got through so the retry does not send it twice.
            self._delivered.update((str(source.path), pos) for (pos, _), ok in zip(todo, delivered, strict=True) if ok)
            self._drop_producer()
            return False
        with self._lock:
            source.advance(end)
            self._delivered.clear()
            if source is not self._own and source.pending == 0:
                logger.info("replayed spill file %s of a previous process", source.path.name)
                source.remove()
                self._orphans.remove(source)
            self._update_spill_gauge()
        return True

    def _connect(self) -> bool:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        if not self._reachable():
            return False
        if self._producer is None:
            timeout_ms = int(self.settings.kafka_timeout * 1000)
            try:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.settings.kafka_bootstrap.split(","),
                    client_id=f"flywheel-{self.name}",
                    acks="all",
                    # Idempotence needs a producer id that a restarted broker no longer knows, which kafka-python
                    # treats as fatal; duplicates are avoided here instead (acks, one request in flight, replay ids).
                    enable_idempotence=False,
                    max_in_flight_requests_per_connection=1,
                    # Batching ~0.1 s of events per produce request keeps the client's CPU cost per event low.
                    linger_ms=100,
                    # send() runs on this thread only; a short block keeps an outage from stalling the queue.
                    max_block_ms=1000,
                    request_timeout_ms=max(1000, timeout_ms // 2),
                    delivery_timeout_ms=timeout_ms,
                    reconnect_backoff_max_ms=1000,
                )
            except KafkaError as exc:
                logger.warning("cannot connect to Kafka at %s: %s", self.settings.kafka_bootstrap, exc)
                return False
        return True

    def _drop_producer(self) -> None:
        # The broker answers but does not take events: start over with a fresh client on the next attempt.
        if self._producer is not None:
            self._producer.close(timeout=0)
            self._producer = None

    def _reachable(self) -> bool:
        for server in self.settings.kafka_bootstrap.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                socket.create_connection((host or "localhost", int(port)), timeout=1.0).close()
                return True
            except (OSError, ValueError):
                continue
        return False

    # Spill files

    def _spill(self, records: list[_Record]) -> None:
        if not records:
            return
        cap = self.settings.spill_max_bytes
        with self._lock:
            if self._own is None:
                self._own = SpillFile.create(self.directory, self.name)
            lines: list[bytes] = []
            size = self._own.size
            dropped: dict[str, int] = {}
            spilled: dict[str, int] = {}
            for record in records:
                line = record.line()
                if size + len(line) > cap:
                    dropped[record.topic] = dropped.get(record.topic, 0) + 1
                    continue
                lines.append(line)
                size += len(line)
                spilled[record.topic] = spilled.get(record.topic, 0) + 1
            if lines:
                self._own.append(b"".join(lines))
            if self._state is PublisherState.CONNECTED:
                self._state = PublisherState.SPILLING
            self._spilled += sum(spilled.values())
            self._update_spill_gauge()
        for topic, count in spilled.items():
            self._metrics.events.labels(topic=topic, outcome="spilled").inc(count)
        if dropped:
            self._count_drops(dropped)

    def _count_drops(self, dropped: dict[str, int]) -> None:
        for topic, count in dropped.items():
            self._metrics.events.labels(topic=topic, outcome="dropped").inc(count)
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
        known = {spill.path for spill in self._orphans} | ({self._own.path} if self._own else set())
        for path in sorted(self.directory.glob("*.spill")):
            if path in known:
                continue
            spill = SpillFile.adopt(path)
            if spill is None:
                continue
            if spill.pending == 0:
                spill.remove()
                continue
            logger.info("adopted spill file %s with %d bytes to replay", path.name, spill.pending)
            with self._lock:
                self._orphans.append(spill)
                if self._state is PublisherState.CONNECTED:
                    self._state = PublisherState.SPILLING
                self._update_spill_gauge()

    def _has_backlog(self) -> bool:
        return bool(self._orphans) or (self._own is not None and self._own.pending > 0)

    def _backlog_bytes(self) -> int:
        return sum(s.pending for s in self._orphans) + (self._own.pending if self._own else 0)

    def _update_spill_gauge(self) -> None:
        self._metrics.spill_bytes.set(self._backlog_bytes())

    def _set_state(self, state: PublisherState) -> None:
        self._state = state
