"""Adaptive batching: concurrent requests are classified together on a single inference thread.

The thread takes every request already waiting, then waits up to ``max_wait_ms`` for as many requests as were in
flight at once while the previous batch ran: concurrent clients whose answers just went out are about to send again,
and one full batch beats two half ones. A lone client never waits. Requests are never split, so each is answered
by exactly one model. The gathered texts are ordered by token count and cut into forward passes of at most
``forward_batch_size`` where padding would cost more than another pass (``flywheel.classifier.plan_passes``): on
CPU, gathering widely (less padding) but computing in small slices (activations stay in cache) was measured
fastest.

With a challenger deployed (``service.challenger``), a canary answers the requests of the callers it draws, in a
forward pass of its own over their texts; a shadow scores a sample of the champion's requests in its own forward
pass after their answers were handed back, so a caller never waits for it, and hands each request's two results to
the request's shadow sink. Throughput is measured over all of it: a shadow's passes take the thread's time too.

Each text is cut to ``CHARS_PER_TOKEN`` characters per token the model reads before it is tokenized. When a forward
pass fails, each request of the batch is run again on its own, so a text that breaks the model fails only its own
request: with 422 when the model classifies other texts (another request of the batch, or the text it classified
before it served), else with 500 (the model broke since it was loaded).

Work nobody awaits is dropped before it joins a batch: a job whose request was cancelled (its client
disconnected, or the server's request timeout fired) is skipped, and one whose deadline passed while it waited is
answered :class:`DeadlineExceededError` (504) without being computed. Each drop is reported to ``on_drop``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flywheel.admission import DeadlineExceededError, drop_reason, hand_over
from flywheel.errors import BadRequestError, FlywheelError
from service.challenger import Challenger
from service.champion import PROBE_TEXT, ServedModel

logger = logging.getLogger(__name__)

#: Characters of a text kept per token the model reads (``max_length``); the rest is cut before tokenizing and the
#: prediction says ``truncated``. Without the cut the tokenizer reads a whole 20,000-character text only to learn
#: that it is cut. A WordPiece token of English covers 4-5 characters on average, spaces included, so 10 per token
#: keeps every token the model reads of ordinary text; the rare text cut shorter (long runs of spaces, or words of
#: over 100 characters, each one [UNK] token) says ``truncated`` like any other cut text.
CHARS_PER_TOKEN = 10
#: Characters of an inference error's message quoted to the client.
MAX_ERROR_CHARS = 200


class NoModelError(FlywheelError):
    """No champion is loaded yet."""


class InferenceError(FlywheelError):
    """The model failed on a request and on the text it classified when loaded: a fault of the server, answered 500."""


@dataclass(frozen=True)
class BatchResult:
    """The share of one batch that belongs to one request."""

    model: ServedModel
    probs: np.ndarray
    truncated: list[bool]


@dataclass(frozen=True)
class ShadowScores:
    """One request's answer and what the shadow challenger of ``deployment_id`` said about the same texts."""

    deployment_id: str
    served: BatchResult
    shadow: BatchResult


#: Receives a shadowed request's scores, on the inference thread; it must not block.
ShadowSink = Callable[[ShadowScores], None]


class _Job:
    __slots__ = ("deadline", "future", "loop", "on_shadow", "route_key", "texts")

    def __init__(
        self,
        texts: list[str],
        future: asyncio.Future[BatchResult],
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        *,
        route_key: str | None,
        on_shadow: ShadowSink | None,
    ) -> None:
        self.texts = texts
        self.future = future
        self.loop = loop
        self.deadline = deadline
        self.route_key = route_key
        self.on_shadow = on_shadow


#: Called after each batch with (texts, requests, seconds of inference).
BatchObserver = Callable[[int, int, float], None]
#: Called for each job dropped before compute, with why: "cancelled" (the client disconnected, or the request
#: timed out) or "expired".
DropObserver = Callable[[str], None]


class MicroBatcher:
    """Gathers texts of concurrent requests into batches for one inference thread."""

    def __init__(
        self,
        current_model: Callable[[], ServedModel | None],
        max_batch_size: int,
        max_wait_ms: float,
        forward_batch_size: int,
        *,
        current_challenger: Callable[[], Challenger | None] = lambda: None,
        observer: BatchObserver | None = None,
        on_drop: DropObserver | None = None,
    ) -> None:
        self.current_model = current_model
        self.current_challenger = current_challenger
        self.max_batch_size = max_batch_size
        self.forward_batch_size = forward_batch_size
        self.max_wait = max_wait_ms / 1000
        self.observer = observer
        self.on_drop = on_drop
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None
        self._lock = threading.Lock()
        self._outstanding = 0
        self._peak = 0
        self._thread: threading.Thread | None = None

    async def submit(
        self,
        texts: list[str],
        deadline: float = math.inf,
        *,
        route_key: str | None = None,
        on_shadow: ShadowSink | None = None,
    ) -> BatchResult:
        """Classify ``texts`` in the next batch that has room for all of them, unless ``deadline`` (a
        ``time.monotonic()`` instant) passes first; cancelling the caller drops the job before compute.

        ``route_key`` names the caller for a canary's routing; ``on_shadow``, when a shadow samples the request,
        receives its scores after the answer went out.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchResult] = loop.create_future()
        with self._lock:
            self._outstanding += 1
            self._peak = max(self._peak, self._outstanding)
        self._queue.put(_Job(texts, future, loop, deadline, route_key=route_key, on_shadow=on_shadow))
        return await future

    def start(self) -> MicroBatcher:
        """Start the inference thread."""
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the queued work and stop the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)

    def alive(self) -> bool:
        """Whether the inference thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _gather(self) -> list[_Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        while first is not None and not self._wanted(first):
            first = self._queue.get()
        if first is None:
            return None
        with self._lock:
            # Concurrency seen since the last batch started; the new window starts from what is in flight now.
            target, self._peak = self._peak, self._outstanding
        jobs, size = [first], len(first.texts)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if len(jobs) >= target or remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                self._queue.put(None)
                break
            if not self._wanted(job):
                continue
            if size + len(job.texts) > self.max_batch_size:
                self._carry = job
                break
            jobs.append(job)
            size += len(job.texts)
        return jobs

    def _wanted(self, job: _Job) -> bool:
        """Whether ``job`` is still awaited within its deadline; a job that is not is settled and reported."""
        reason = drop_reason(job.future, job.deadline)
        if reason is None:
            return True
        expired = DeadlineExceededError("the request waited for inference past its deadline (FLYWHEEL_SERVE_TIMEOUT)")
        self._settle([job], [expired])
        if self.on_drop is not None:
            self.on_drop(reason)
        return False

    def _run(self) -> None:
        while (jobs := self._gather()) is not None:
            self._process(jobs)

    def _process(self, jobs: list[_Job]) -> None:
        # Read the references once: each request of the batch runs on, and reports, one model.
        model = self.current_model()
        if model is None:
            error: BaseException = NoModelError("no champion model loaded yet: train and promote one first")
            self._settle(jobs, [error] * len(jobs))
            return
        challenger = self.current_challenger()
        if challenger is not None and challenger.version == model.version:
            challenger = None  # promoted meanwhile: the champion serves it already
        started = time.perf_counter()
        ours, theirs = jobs, []
        if challenger is not None and not challenger.shadow:
            ours = [job for job in jobs if not challenger.answers(job.route_key)]
            theirs = [job for job in jobs if challenger.answers(job.route_key)]
        # Each side's answers go out as soon as its pass is done.
        answers = self._answer(model, ours) if ours else []
        self._settle(ours, answers)
        if challenger is not None and theirs:
            self._settle(theirs, self._answer(challenger.model, theirs))
        if challenger is not None and challenger.shadow:
            self._shadow(challenger, [
                (job, result)
                for job, result in zip(ours, answers, strict=True)
                if job.on_shadow is not None and isinstance(result, BatchResult) and challenger.samples()
            ])
        seconds = time.perf_counter() - started
        if self.observer is not None:
            self.observer(sum(len(job.texts) for job in jobs), len(jobs), seconds)

    def _answer(self, model: ServedModel, jobs: list[_Job]) -> list[BatchResult | BaseException]:
        """Each job's share of one pass of ``model`` over their texts; alone when the pass fails."""
        texts = [text for job in jobs for text in job.texts]
        try:
            whole = self._classify(model, texts)
        except Exception as exc:  # noqa: BLE001 - whatever the model's code raises, only its requests may fail
            logger.warning(
                "inference failed for a batch of %d texts in %d requests on model %s (%s); running each request alone",
                len(texts),
                len(jobs),
                model.version,
                _describe(exc),
            )
            return self._isolate(model, jobs, exc)
        results: list[BatchResult | BaseException] = []
        start = 0
        for job in jobs:
            end = start + len(job.texts)
            results.append(BatchResult(model, whole.probs[start:end], whole.truncated[start:end]))
            start = end
        return results

    def _shadow(self, challenger: Challenger, sampled: list[tuple[_Job, BatchResult]]) -> None:
        """The shadow's pass over the sampled requests, handed to their sinks; a failure costs only the shadow."""
        if not sampled:
            return
        texts = [text for job, _ in sampled for text in job.texts]
        try:
            whole = self._classify(challenger.model, texts)
        except Exception as exc:  # noqa: BLE001 - the answers went out already; only the shadow's figures miss them
            logger.warning("shadow %s failed on %d texts (%s); those requests are not shadowed", challenger.version,
                           len(texts), _describe(exc))
            return
        start = 0
        for job, served in sampled:
            end = start + len(job.texts)
            scores = ShadowScores(
                challenger.deployment.deployment_id,
                served,
                BatchResult(challenger.model, whole.probs[start:end], whole.truncated[start:end]),
            )
            start = end
            try:
                if job.on_shadow is not None:
                    job.on_shadow(scores)
            except Exception:
                logger.exception("the shadow sink of a request failed; its shadow predictions are lost")

    def _classify(self, model: ServedModel, texts: list[str]) -> BatchResult:
        budget = model.classifier.max_length * CHARS_PER_TOKEN
        out = model.classifier.predict_proba([text[:budget] for text in texts], batch_size=self.forward_batch_size)
        truncated = [len(text) > budget or cut for text, cut in zip(texts, out.truncated, strict=True)]
        return BatchResult(model, out.probs, truncated)

    def _isolate(self, model: ServedModel, jobs: list[_Job], error: Exception) -> list[BatchResult | BaseException]:
        """Each request of a failed batch on its own; those that fail again get an error of their own."""
        outcomes: list[BatchResult | Exception] = [error]  # a batch of one request would fail the same way again
        if len(jobs) > 1:
            outcomes = []
            for job in jobs:
                try:
                    outcomes.append(self._classify(model, job.texts))
                except Exception as exc:  # noqa: BLE001 - this request's answer, logged with the others below
                    outcomes.append(exc)
        failed = sum(isinstance(outcome, Exception) for outcome in outcomes)
        broken = failed == len(jobs) and not self._works(model)
        if broken:
            logger.error(
                "model %s fails on every text, the one it classified when loaded included",
                model.version,
                exc_info=error,
            )
        else:
            logger.warning(
                "model %s cannot classify %d of %d requests; they are answered 422", model.version, failed, len(jobs)
            )
        results: list[BatchResult | BaseException] = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, BatchResult):
                results.append(outcome)
            elif broken:
                results.append(
                    InferenceError(
                        f"inference failed on model {model.version} ({_describe(outcome)}) and the model classifies "
                        "nothing else either; the error is logged: retry later, or report it if it persists"
                    )
                )
            else:
                what = "this text" if len(job.texts) == 1 else f"one or more of these {len(job.texts)} texts"
                results.append(
                    BadRequestError(
                        422,
                        f"model {model.version} cannot classify {what} ({_describe(outcome)}), though it classifies "
                        "other texts; change or shorten it",
                    )
                )
        return results

    def _works(self, model: ServedModel) -> bool:
        try:
            self._classify(model, [PROBE_TEXT])
        except Exception:  # noqa: BLE001 - the model fails on any text: the caller logs the original error
            return False
        return True

    def _settle(self, jobs: list[_Job], results: list[BatchResult | BaseException]) -> None:
        with self._lock:
            self._outstanding -= len(jobs)
        hand_over((job.loop, job.future, result) for job, result in zip(jobs, results, strict=True))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
