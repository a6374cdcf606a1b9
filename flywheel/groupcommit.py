"""Group commit of a spill file's appends: each append is on stable storage within a bounded interval.

An append only writes to the page cache, which survives the death of the process but not a power loss. The first
append not yet synced starts a clock; ``interval`` seconds later one ``fdatasync`` covers it and every append made
meanwhile, so a burst of appends costs one fsync instead of one each, and none waits longer than ``interval`` plus
that fsync. Appenders never wait for the fsync. With ``interval`` 0 every append is synced before it returns.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from flywheel.metrics import publisher_metrics
from flywheel.supervision import Supervised, describe

logger = logging.getLogger(__name__)


class GroupCommit:
    """Syncs the appends to one open file descriptor, at most ``interval`` seconds after each."""

    def __init__(self, fd: int, name: str, interval: float) -> None:
        self._fd = fd
        self.interval = interval
        self._changed = threading.Condition()
        #: When the oldest append not yet covered by an fsync was made (monotonic), None when all are synced.
        self._first_unsynced: float | None = None
        self._stop = threading.Event()
        self._lag = publisher_metrics().fsync_lag
        #: fsyncs done, for the benchmark and the tests.
        self.syncs = 0
        self._thread = Supervised(f"spill-sync-{name}", self._run, self._stop).start() if interval > 0 else None

    def appended(self) -> None:
        """Note an append: it is synced within ``interval`` seconds (at once, raising its error, if that is 0)."""
        if self._thread is None:
            self._sync(time.monotonic())
            return
        if self._first_unsynced is not None:
            # A group is open: its fsync clears the mark before it starts, so it will cover this append. No lock.
            return
        now = time.monotonic()
        with self._changed:
            if self._first_unsynced is None:
                self._first_unsynced = now
                self._changed.notify()

    def health_detail(self) -> str | None:
        """Why appends are not reaching stable storage right now, or None when they are."""
        if self._thread is None:
            return None
        health = self._thread.health()
        return None if health.up or self._stop.is_set() else health.detail

    def close(self) -> None:
        """Sync what is left and stop; the caller closes the file descriptor afterwards."""
        self._stop.set()
        if self._thread is not None:
            with self._changed:
                self._changed.notify_all()
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._first_unsynced is None and not self._stop.is_set():
                    self._changed.wait()
                first = self._first_unsynced
                if first is None:
                    return  # stopping, and everything is synced
            # Appends until the deadline share this fsync; a stop request syncs at once.
            self._stop.wait(max(0.0, first + self.interval - time.monotonic()))
            with self._changed:
                # Cleared before the fsync starts: an append after this point is left for the next round.
                self._first_unsynced = None
            try:
                self._sync(first)
            except OSError as exc:
                with self._changed:
                    self._first_unsynced = first if self._first_unsynced is None else self._first_unsynced
                assert self._thread is not None
                self._thread.fault(f"cannot fsync the spill file ({describe(exc)}); retrying")
                logger.warning("cannot fsync the spill file, retrying: %s", exc)
                # Not a busy loop when the error stays: retry after one interval.
                if self._stop.wait(self.interval):
                    return
                continue
            if self._thread is not None:
                self._thread.recovered()

    def _sync(self, first: float) -> None:
        os.fdatasync(self._fd)
        self.syncs += 1
        self._lag.observe(time.monotonic() - first)
