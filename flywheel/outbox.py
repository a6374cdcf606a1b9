"""The publisher's disk side and its ledger: the spill backlog behind one lock, and what became of every event.

``EventPublisher`` decides where an event goes; the outbox puts it on disk (``flywheel.spill``), replays the backlog a
chunk at a time, and counts each outcome (sent, spilled, dropped) in totals and Prometheus series. Its lock is the
publisher's too, so a state change made under it is ordered with the backlog's contents.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping

from flywheel.metrics import publisher_metrics
from flywheel.settings import CoreSettings
from flywheel.spill import Backlog, Record

logger = logging.getLogger(__name__)

#: Least time between two "dropping events" log lines, in seconds.
DROP_LOG_SECONDS = 60.0


class Outbox:
    """A publisher's spill backlog and outcome counters; every backlog call but ``read`` runs under ``lock``."""

    def __init__(self, settings: CoreSettings, name: str) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        self.backlog = Backlog(settings.home / "spill", name, settings.spill_max_bytes, settings.spill_fsync_ms / 1000)
        self.sent = self.spilled = self.dropped = 0
        self._last_drop_log = 0.0
        self._drops_since_log = 0
        self._metrics = publisher_metrics()

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting in spill files for replay."""
        return self.backlog.pending

    def has_pending(self) -> bool:
        """Whether anything waits on disk for replay."""
        return self.backlog.has_pending()

    def count_sent(self, by_topic: Mapping[str, int]) -> None:
        """Count events Kafka acknowledged."""
        self._metrics.count("sent", by_topic)
        with self.lock:
            self.sent += sum(by_topic.values())

    def spill(self, records: list[Record], while_locked: Callable[[], None]) -> None:
        """Append ``records`` to the own spill file, calling ``while_locked`` under the lock once they are there.

        Raises ``OSError`` when the disk refuses them (none is then on disk). Those over the disk cap are dropped.
        """
        if not records:
            return
        with self.lock:
            spilled, dropped = self.backlog.append(records)
            while_locked()
            self.spilled += sum(spilled.values())
            self._update_gauge()
        self._metrics.count("spilled", spilled)
        if dropped:
            self.drop(
                dropped,
                f"the spill file reached its cap of {self.settings.spill_max_bytes} bytes (FLYWHEEL_SPILL_MAX_BYTES) "
                f"while Kafka at {self.settings.kafka_bootstrap} is unreachable",
            )

    def drop(self, by_topic: Mapping[str, int], reason: str) -> None:
        """Count events that could be kept nowhere; logged at most once a minute, with ``reason``."""
        self._metrics.count("dropped", by_topic)
        with self.lock:
            self.dropped += sum(by_topic.values())
            self._drops_since_log += sum(by_topic.values())
            now = time.monotonic()
            if now - self._last_drop_log < DROP_LOG_SECONDS:
                return
            drops, self._drops_since_log, self._last_drop_log = self._drops_since_log, 0, now
        logger.error("dropped %d events: %s", drops, reason)

    def drop_records(self, records: list[Record], reason: str) -> None:
        """Count ``records`` as dropped."""
        self.drop(Counter(record.topic for record in records), reason)

    def adopt_orphans(self, while_locked: Callable[[], None]) -> None:
        """Adopt the spill files of dead processes; ``while_locked`` runs under the lock when there were any."""
        found = self.backlog.find_orphans()
        if not found:
            return
        with self.lock:
            self.backlog.orphans.extend(found)
            while_locked()
            self._update_gauge()

    def replay_chunk(
        self, chunk: int, send: Callable[[list[Record]], list[bool]], drained: Callable[[], None]
    ) -> bool:
        """Send the backlog's next ``chunk`` records; True when all got through.

        With nothing left to replay, ``drained`` runs under the lock (no spill can slip in before it) and the
        answer is True.
        """
        with self.lock:
            if not self.backlog.has_pending():
                self.backlog.drained()
                drained()
                self._update_gauge()
                return True
            source = self.backlog.next_source()
        assert source is not None
        todo, end = self.backlog.read(source, chunk)
        delivered = send([record for _, record in todo])
        if not all(delivered):
            self.backlog.delivered(source, [pos for (pos, _), ok in zip(todo, delivered, strict=True) if ok])
            return False
        with self.lock:
            self.backlog.replayed(source, end)
            self._update_gauge()
        return True

    def sync_fault(self) -> str | None:
        """Why spilled events are not reaching stable storage right now, or None."""
        return self.backlog.sync_fault()

    def close(self) -> None:
        """Delete fully replayed files and release the others for another process to adopt."""
        with self.lock:
            self.backlog.close()

    def _update_gauge(self) -> None:
        self._metrics.spill_bytes.set(self.backlog.pending)
