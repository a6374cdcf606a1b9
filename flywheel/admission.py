"""Admission control: bounded work in flight per worker, shared fairly between principals, refused at once.

A route admits a request's units (texts for ``/predict``, requests for ``/feedback``, body bytes) before it does
the work, and gives them back when it has answered. Beyond the bound it answers 503 with ``Retry-After`` at once:
a request queued behind more work than the worker does in the request timeout would only be answered 504 later,
after holding memory all that time.

The bound follows the worker's own measured throughput (:class:`Throughput`, units per second of compute): it
admits ``rate × seconds`` units, clamped to a floor and a ceiling, so a faster model or runtime admits more with no
change of configuration.

Fairness: a request is admitted while the worker's total stays within the bound, or while its principal holds no
more than its fair share (the bound divided by the principals holding work, itself included). So one principal
may use an idle worker whole, but once it floods the bound another principal's requests are still admitted, and
the flooding one is refused until it is back under its share; a principal holding nothing is admitted whatever
its request's size. The second rule can take the total over the bound by one bound's worth (the shares add up to
one bound) plus one request per principal; the byte bound, which has no such exception, keeps memory within twice
its size. A request arriving at an idle worker is always admitted, whatever its size.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from flywheel.errors import FlywheelError
from flywheel.metrics import admission_metrics

#: Weight of each new batch in the throughput average: the last ~10 batches dominate, so a new model or a change
#: of traffic moves the bound within a few seconds while one odd batch barely does.
EWMA_WEIGHT = 0.1
#: Longest Retry-After advised: beyond a minute a client learns nothing more from the number.
MAX_RETRY_AFTER = 60


class OverloadedError(FlywheelError):
    """The worker holds as much work as it admits; answered 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class DeadlineExceededError(FlywheelError):
    """Admitted work waited past its deadline and was dropped before compute; answered 504."""


def drop_reason(future: asyncio.Future[Any], deadline: float) -> str | None:
    """Why queued work is dropped before it is done: "cancelled" (its request was cancelled: the client left, or
    the request timed out), "expired" (its ``time.monotonic()`` deadline passed), or None while it is awaited.

    Read from a worker thread without the event loop: a cancelled future stays cancelled, so a stale read only
    delays the drop to a later check, and a result set after all is discarded where the future is resolved.
    """
    if future.cancelled():
        return "cancelled"
    if time.monotonic() > deadline:
        return "expired"
    return None


def hand_over(outcomes: Iterable[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any]]) -> None:
    """From a worker thread, resolve each future on its loop with its outcome (an exception is raised to its
    awaiter): one wake-up of each event loop per batch, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for loop, future, outcome in outcomes:
        by_loop.setdefault(loop, []).append((future, outcome))
    for loop, answers in by_loop.items():
        if loop.is_closed():
            continue  # the server is shutting down; nobody awaits these any more
        # A loop closed since the check above has nobody waiting either.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, answers)


def _resolve(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in answers:
        if future.done():
            continue  # the client went away and the request was cancelled
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class Throughput:
    """Units per second of a worker's compute, an exponentially weighted average over its batches.

    Units and seconds are averaged apart and divided, so a batch counts by its size: small batches (less
    efficient) do not drag the rate down more than the little work they are. With ``full``, only batches of at
    least that many units are averaged, and the rate is unknown until one was seen: a bound only matters under
    load, when batches are full, and a rate read off batches of one text (a quiet hour of single clients) is half
    of it, which would refuse the first busy minute.
    """

    def __init__(self, full: int = 1) -> None:
        self.full = full
        self._lock = threading.Lock()
        self._units = 0.0
        self._seconds = 0.0

    def observe(self, units: int, seconds: float) -> None:
        """Record ``units`` of work done in ``seconds``."""
        if units < self.full:
            return
        with self._lock:
            if self._seconds == 0.0:
                self._units, self._seconds = float(units), seconds
            else:
                self._units += EWMA_WEIGHT * (units - self._units)
                self._seconds += EWMA_WEIGHT * (seconds - self._seconds)

    def rate(self) -> float | None:
        """Units per second, or None before anything was measured."""
        with self._lock:
            return self._units / self._seconds if self._seconds > 0 else None


def sized_limit(
    fixed: int | None, throughput: Throughput, seconds: float, floor: int, ceiling: int, *, initial: int | None = None
) -> Callable[[], int]:
    """A bound: ``fixed`` when configured, else ``throughput × seconds`` between ``floor`` and ``ceiling``;
    ``initial`` (default ``floor``) until anything is measured."""
    if fixed is not None:
        return lambda: fixed

    def limit() -> int:
        rate = throughput.rate()
        if rate is None:
            return initial or floor
        return max(floor, min(ceiling, int(rate * seconds)))

    return limit


class FairBudget:
    """Units held per principal under one bound, with the admission rule of this module.

    With ``one_each``, a principal holding nothing is admitted whatever the request's size, so a principal's
    fair share never falls below one request (a share of 8 texts would otherwise refuse every request of 16).
    Then the total may pass twice the bound by one request per principal; a bound on the bytes behind those
    units (without ``one_each``) keeps memory bounded all the same.
    """

    def __init__(self, limit: Callable[[], int], *, one_each: bool = False) -> None:
        self.limit = limit
        self.one_each = one_each
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self.total = 0

    def try_take(self, principal: str, units: int) -> bool:
        """Take ``units`` for ``principal`` if the rule admits them; whether it did."""
        with self._lock:
            limit = self.limit()
            mine = self._held.get(principal, 0)
            holders = len(self._held) + (0 if mine else 1)
            fair = mine + units <= limit / holders or (self.one_each and not mine)
            if self.total and self.total + units > limit and not fair:
                return False
            self._held[principal] = mine + units
            self.total += units
            return True

    def give(self, principal: str, units: int) -> None:
        """Give back units taken for ``principal``."""
        with self._lock:
            left = self._held.get(principal, 0) - units
            if left > 0:
                self._held[principal] = left
            else:
                self._held.pop(principal, None)
            self.total -= units

    def held(self, principal: str) -> int:
        """Units ``principal`` holds now."""
        with self._lock:
            return self._held.get(principal, 0)


class Ticket:
    """What one request holds; ``release`` (idempotent) gives it all back."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held: list[tuple[FairBudget, str, int]] = []

    def take(self, budget: FairBudget, principal: str, units: int) -> bool:
        """Take ``units`` of ``budget``; False (and nothing taken) when the bound refuses them."""
        if not budget.try_take(principal, units):
            return False
        self._held.append((budget, principal, units))
        self._admission.publish()
        return True

    def release(self) -> None:
        """Give back everything this request holds."""
        held, self._held = self._held, []
        for budget, principal, units in held:
            budget.give(principal, units)
        if held:
            self._admission.publish()


class Admission:
    """One route's admission in one worker: its work bound (fair per principal), metrics and refusals."""

    def __init__(
        self, route: str, unit: str, limit: Callable[[], int], throughput: Throughput, body_limit: int | None = None
    ) -> None:
        self.route = route
        self.unit = unit
        self.work = FairBudget(limit, one_each=True)
        self.throughput = throughput
        #: Body bytes held by requests of this route, being read or in flight (None: the route needs no byte bound).
        self.body = FairBudget(lambda: body_limit) if body_limit is not None else None
        self.metrics = admission_metrics()
        self._refusals_lock = threading.Lock()
        #: (monotonic time, units) of recent refusals, for the demand ``retry_after`` advises by.
        self._refusals: deque[tuple[float, int]] = deque()
        self._advised = 1

    def ticket(self) -> Ticket:
        """An empty ticket for one request; release it once the request is answered."""
        return Ticket(self)

    def admit_work(self, ticket: Ticket, principal: str, units: int) -> None:
        """Admit ``units`` of work for ``principal`` on ``ticket``, or raise :class:`OverloadedError`."""
        if not ticket.take(self.work, principal, units):
            self._refuse(self.work, self.unit, principal, units, self.unit)

    def admit_body(self, ticket: Ticket, principal: str, size: int) -> None:
        """Admit ``size`` body bytes for ``principal`` on ``ticket``, or raise :class:`OverloadedError`."""
        if self.body is not None and not ticket.take(self.body, principal, size):
            self._refuse(self.body, "body", principal, size, "body bytes")

    def retry_after(self, refused: int = 0) -> int:
        """Seconds until the work in flight, and the refused work due back within the last advised wait, would be
        done at the measured rate (1 before anything is measured); ``refused`` records a refusal of that many units
        first."""
        rate = self.throughput.rate()
        now = time.monotonic()
        with self._refusals_lock:
            if refused:
                self._refusals.append((now, refused))
            while self._refusals and self._refusals[0][0] < now - self._advised:
                self._refusals.popleft()
            due = sum(units for _, units in self._refusals)
            if not rate:
                return 1
            self._advised = max(1, min(MAX_RETRY_AFTER, math.ceil((self.work.total + due) / rate)))
            return self._advised

    def publish(self) -> None:
        """Export what is in flight and the bound now."""
        self.metrics.in_flight.labels(route=self.route).set(self.work.total)
        self.metrics.limit.labels(route=self.route).set(self.work.limit())

    def _refuse(self, budget: FairBudget, reason: str, principal: str, units: int, what: str) -> None:
        self.metrics.refused.labels(route=self.route, reason=reason).inc()
        wait = self.retry_after(refused=units if budget is self.work else 0)
        raise OverloadedError(
            f"this worker is at capacity ({budget.total} {what} in flight, bound {budget.limit()}; {principal!r} "
            f"holds {budget.held(principal)} and asked for {units} more): retry in {wait}s",
            wait,
        )
