"""Group commit of ``POST /feedback``: concurrent submissions are stored in one transaction, and each is answered
only once the transaction holding its row has committed, so a 202 always means the label is stored.

One writer thread per open database stores them. It takes every submission already waiting; while fewer have
joined than were in flight at once since the previous transaction started, it waits up to
``FLYWHEEL_FEEDBACK_COMMIT_MS`` for the rest. Concurrent clients then share one commit (one WAL flush, and one hold
of their source's row lock, which every label of a principal takes) while a lone client never waits. At most
``MAX_ROWS`` rows share a transaction. Rows are written ordered by principal (stably: one principal's submissions
keep their order), so the transactions of several workers take the source row locks in one order.

A refusal (409: the label was already used for training) fails its own submission only, and the transaction goes
on. Any other error rolls the whole transaction back; each of its submissions is then stored in a transaction of
its own (``FeedbackStore.submit``), so only the bad one fails, as ``service.batcher`` isolates a failed batch.

Work nobody awaits is dropped before it is written: a submission whose request was cancelled (the client
disconnected, or the request timed out) is skipped, and one whose deadline passed while it waited is answered
:class:`DeadlineExceededError` (504). Each drop is reported to ``on_drop``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError

from feedback.store import FeedbackStore
from flywheel.admission import DeadlineExceededError, drop_reason, hand_over
from flywheel.models.feedback import FeedbackCreate, FeedbackPublic

logger = logging.getLogger(__name__)

#: Most rows in one transaction: bounds how long a source's row lock is held, and what one bad row makes run again.
MAX_ROWS = 64
#: Seconds an idle writer thread waits for work before it exits (the next submission starts another), so a store
#: nobody writes to holds no thread.
IDLE_SECONDS = 30.0
#: Rows per transaction, the buckets of ``flywheel_feedback_commit_rows``.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

#: Called for each submission dropped before it was written, with why: "cancelled" or "expired".
DropObserver = Callable[[str], None]
Outcome = FeedbackPublic | BaseException


@functools.cache
def commit_metrics() -> Any:
    """Rows per ``POST /feedback`` transaction, created on first use (after BentoML set PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Histogram

    return Histogram(
        "flywheel_feedback_commit_rows",
        "Labels stored per committed POST /feedback transaction (group commit; refused ones not counted); _count "
        "is the transactions.",
        buckets=ROW_BUCKETS,
    )


@dataclass(eq=False)
class _Submission:
    create: FeedbackCreate
    principal: str
    deadline: float
    future: asyncio.Future[FeedbackPublic]
    loop: asyncio.AbstractEventLoop
    #: Seconds of the writer thread this submission took (its share of its transaction), appended once written.
    spent: list[float] | None = field(default=None)


class SubmissionQueue:
    """The submissions of one store waiting for the transaction they will share."""

    def __init__(
        self,
        store: FeedbackStore,
        commit_ms: float,
        *,
        max_rows: int = MAX_ROWS,
        on_drop: DropObserver | None = None,
        name: str = "feedback-commit",
    ) -> None:
        self.store = store
        self.window = commit_ms / 1000
        self.max_rows = max_rows
        self.on_drop = on_drop
        self.name = name
        self._changed = threading.Condition()
        self._waiting: deque[_Submission] = deque()
        #: Submissions not answered yet, and the most at once since the last transaction started.
        self._outstanding = 0
        self._peak = 0
        self._writing = False

    async def submit(
        self,
        create: FeedbackCreate,
        principal: str,
        deadline: float = math.inf,
        spent: list[float] | None = None,
    ) -> FeedbackPublic:
        """Store one label of ``principal`` (as ``FeedbackStore.submit``) in the next transaction; returns once that
        transaction has committed. Dropped unwritten when cancelled, or when ``deadline`` (``time.monotonic()``)
        passes before it is written."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[FeedbackPublic] = loop.create_future()
        with self._changed:
            self._waiting.append(_Submission(create, principal, deadline, future, loop, spent))
            self._outstanding += 1
            self._peak = max(self._peak, self._outstanding)
            if self._writing:
                self._changed.notify()
            else:
                self._writing = True
                threading.Thread(target=self._run, name=self.name, daemon=True).start()
        return await future

    def _run(self) -> None:
        try:
            while (batch := self._gather()) is not None:
                if batch:
                    self._write(batch)
        except BaseException:
            # A bug here must not leave later submissions waiting for a thread that is gone: the next starts another.
            with self._changed:
                self._writing = False
            logger.exception("the feedback writer thread %s failed", self.name)
            raise

    def _gather(self) -> list[_Submission] | None:
        """The next transaction's submissions (empty when all were dropped); None once idle, the thread exiting."""
        with self._changed:
            if not self._waiting:
                self._changed.wait(IDLE_SECONDS)
            if not self._waiting:
                # Under the lock: a submission arriving after this starts a new thread.
                self._writing = False
                return None
            # Concurrency seen since the last transaction started; the new round starts from what is waiting now.
            target, self._peak = min(self._peak, self.max_rows), self._outstanding
            until = time.monotonic() + self.window
            while len(self._waiting) < target and (left := until - time.monotonic()) > 0:
                self._changed.wait(left)
            batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_rows))]
        return [job for job in batch if self._wanted(job)]

    def _wanted(self, job: _Submission) -> bool:
        """Whether ``job`` is still awaited within its deadline; a job that is not is settled and reported."""
        reason = drop_reason(job.future, job.deadline)
        if reason is None:
            return True
        self._settle([(job, _expired())])
        if self.on_drop is not None:
            self.on_drop(reason)
        return False

    def _write(self, batch: list[_Submission]) -> None:
        # Stable: one principal's submissions keep their order, and every worker locks sources in one order.
        batch.sort(key=lambda job: job.principal)
        started = time.perf_counter()
        outcomes: list[Outcome] = []
        try:
            outcomes.extend(self.store.submit_many([(job.create, job.principal) for job in batch]))
        except Exception as exc:  # noqa: BLE001 - whichever row broke the transaction, only that one may fail
            if len(batch) == 1:
                # It was alone already: only a concurrent insert of its row is worth another try (as an update,
                # which is what FeedbackStore.submit retries).
                outcomes = [self._alone(batch[0]) if isinstance(exc, IntegrityError) else exc]
            else:
                logger.warning(
                    "storing %d feedback rows in one transaction failed (%s: %s); storing each alone",
                    len(batch),
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
                outcomes = [self._alone(job) for job in batch]
        else:
            commit_metrics().observe(sum(isinstance(outcome, FeedbackPublic) for outcome in outcomes))
        share = (time.perf_counter() - started) / len(batch)
        for job in batch:
            if job.spent is not None:
                job.spent.append(share)
        self._settle(list(zip(batch, outcomes, strict=True)))

    def _alone(self, job: _Submission) -> Outcome:
        """``job`` stored in a transaction of its own, or the error that fails it."""
        # Checked again: a database that went away makes each row of the failed transaction fail on its own, and
        # the deadline bounds how long the rest wait for that.
        if time.monotonic() > job.deadline:
            if self.on_drop is not None:
                self.on_drop("expired")
            return _expired()
        try:
            saved = self.store.submit(job.create, job.principal)
        except Exception as exc:  # noqa: BLE001 - this submission's own answer
            return exc
        commit_metrics().observe(1)
        return saved

    def _settle(self, pairs: list[tuple[_Submission, Outcome]]) -> None:
        with self._changed:
            self._outstanding -= len(pairs)
        hand_over((job.loop, job.future, outcome) for job, outcome in pairs)


def _expired() -> DeadlineExceededError:
    return DeadlineExceededError("the request waited for the database past its deadline (FLYWHEEL_SERVE_TIMEOUT)")
