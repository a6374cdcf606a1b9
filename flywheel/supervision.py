"""Background threads that outlive their own failures: restarted with backoff, their fault shown until they recover.

A thread's work is a function that returns once its stop event is set. Should it raise instead, the exception is
logged with its traceback and counted, the thread's health turns down, and the function runs again after an
exponential backoff (tenacity). A function may also report a failure it handles itself (``fault``: a full disk, a
database it keeps retrying) and that work goes through again (``recovered``), which clears the fault and resets the
backoff. ``health()`` feeds ``/readyz``; ``flywheel_thread_up`` and ``flywheel_thread_faults_total`` the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tenacity import RetryCallState, Retrying, retry_if_exception_type

from flywheel.metrics import thread_metrics
from flywheel.retry import failure, wait_on

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

#: First wait after a crash, in seconds; it doubles with each crash in a row, up to ``MAX_BACKOFF``.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 30.0
#: Seconds a restarted work must run before its recovery resets the backoff, so a crash loop stays slow.
STEADY_SECONDS = 5.0


@dataclass(frozen=True)
class Health:
    """Whether a thread does its work, why not, and how many faults it had since it started."""

    up: bool
    detail: str
    faults: int


def describe(error: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message."""
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class Supervised:
    """Runs ``work`` on a daemon thread named ``name`` until ``stop`` is set, restarting it whenever it raises."""

    def __init__(
        self,
        name: str,
        work: Callable[[], None],
        stop: threading.Event,
        *,
        first_backoff: float = FIRST_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self._work = work
        self._stop = stop
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._lock = threading.Lock()
        self._fault: str | None = None
        self._faults = 0
        #: Crashes since the work last recovered: the exponent of the next backoff.
        self._streak = 0
        #: When the work was last restarted after a crash (monotonic).
        self._restarted_at = 0.0
        metrics = thread_metrics(registry)
        self._up = metrics.up.labels(thread=name)
        self._fault_count = metrics.faults.labels(thread=name)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Supervised:
        """Start the thread; returns at once."""
        self._up.set(1)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after ``stop`` is set)."""
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        """Whether the thread runs (it ends only once ``stop`` is set)."""
        return self._thread.is_alive()

    def health(self) -> Health:
        """Up unless the work is failing right now; the detail names the fault."""
        with self._lock:
            if not self._thread.is_alive():
                detail = "not started" if self._thread.ident is None else "stopped"
                return Health(False, detail, self._faults)
            if self._fault is not None:
                return Health(False, self._fault, self._faults)
            return Health(True, "running", self._faults)

    def fault(self, detail: str) -> None:
        """Report a failure the work handles itself; shown (and counted once) until ``recovered()``."""
        self._set_fault(detail, count=self._fault is None)

    def recovered(self) -> None:
        """Report that the work goes through again: clears the fault and resets the backoff."""
        if self._fault is None and self._streak == 0:
            return  # the common case, called after every step of the work: no lock
        with self._lock:
            was, self._fault = self._fault, None
            if time.monotonic() - self._restarted_at >= STEADY_SECONDS:
                self._streak = 0
        self._up.set(1)
        if was is not None:
            logger.info("%s recovered (was: %s)", self.name, was)

    def _set_fault(self, detail: str, *, count: bool) -> None:
        with self._lock:
            self._fault = detail
            if count:
                self._faults += 1
        if count:
            self._fault_count.inc()
        self._up.set(0)

    def _run(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(Exception),
            wait=self._backoff,
            stop=lambda _: self._stop.is_set(),
            sleep=wait_on(self._stop),
            after=self._crashed,
            before_sleep=self._log_restart,
            retry_error_callback=lambda _: None,
        )
        retrying(self._work)
        self._up.set(0)

    def _backoff(self, _: RetryCallState) -> float:
        with self._lock:
            return min(self._max_backoff, self._first_backoff * 2 ** max(0, self._streak - 1))

    def _crashed(self, state: RetryCallState) -> None:
        error = failure(state)
        logger.error("%s failed unexpectedly", self.name, exc_info=error)
        with self._lock:
            self._streak += 1
        self._set_fault(f"failed ({describe(error)}); restarting with backoff", count=True)

    def _log_restart(self, state: RetryCallState) -> None:
        with self._lock:
            self._restarted_at = time.monotonic() + (state.upcoming_sleep or 0.0)
        logger.warning(
            "%s restarts in %.1f s after: %s",
            self.name,
            state.upcoming_sleep,
            describe(failure(state)),
        )
