"""Feedback routes mounted on the service: ``POST /feedback``, ``GET /feedback/{id}``, ``GET /review``, and the
reviewer's ``POST /feedback/{id}/confirm|resolve`` and ``POST /sources/{name}/trust|distrust|quarantine|release``.

A label's source is the principal that sent it; what a client writes as ``source`` is kept as a note and grants
nothing. Rate limits are per principal and shared by every worker (see ``feedback.ratelimit``).

The worker's one database is opened in the background, so predictions are served even while it is down; these
routes get it through a FastAPI dependency, and the app answers 503 while it is unreachable.

``POST /feedback`` admits each request before reading its body (see ``flywheel.admission``): at most
``FLYWHEEL_FEEDBACK_MAX_IN_FLIGHT`` per worker (unset: sized from the requests/s its database work is measured to
take), fair per principal, else 503 with ``Retry-After``. Its database work is dropped before it starts when the
client has disconnected or the request waited past ``FLYWHEEL_SERVE_TIMEOUT``. Concurrent labels are stored in one
transaction (group commit, ``feedback.submissions``), and each is answered 202 only once that has committed.
"""

# No `from __future__ import annotations`: FastAPI reads route signatures at run time, and their dependencies
# are closures of `create_router`, which string annotations could not name.

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Annotated, Any, NamedTuple, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from feedback.decisions import FeedbackConflictError, FeedbackNotFoundError
from feedback.ratelimit import RateLimiter
from feedback.review import MAX_LIMIT, ReviewItem, ReviewQueue
from feedback.store import FeedbackStore, feedback_event
from feedback.submissions import SubmissionQueue
from flywheel.access import Caller
from flywheel.admission import Admission, DeadlineExceededError, Throughput, sized_limit
from flywheel.auth import Access
from flywheel.database import BackgroundDatabase, Database
from flywheel.errors import describe_validation_errors
from flywheel.http import ClientDisconnectedError, parse_json_object, read_body, unless_disconnected
from flywheel.label_set import UnknownLabelError
from flywheel.metrics import admission_metrics
from flywheel.models.access import Role
from flywheel.models.feedback import FeedbackCreate, FeedbackPublic, FeedbackSourcePublic, InvalidSourceError
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelVersion
from flywheel.settings import Settings

logger = logging.getLogger(__name__)

EXAMPLE = (
    '{"prediction_id": "<id from /predict>", "label": "positive"} '
    'or {"text": "a new text", "label": "negative", "comment": "why"}'
)
#: Bytes a JSON body may take per character of text (\\uXXXX escapes), plus room for the other fields.
_BYTES_PER_CHAR = 6
_BODY_OVERHEAD = 4096
#: Threads doing database work per worker: few threads contend less for the GIL than one per request.
DB_THREADS = 4
#: Floor and ceiling of the measured bound on /feedback requests in flight per worker.
MIN_IN_FLIGHT = 16
MAX_IN_FLIGHT = 1024
T = TypeVar("T")


class Backend(NamedTuple):
    """What the routes use of one opened database."""

    store: FeedbackStore
    queue: ReviewQueue
    limiter: RateLimiter
    submissions: SubmissionQueue


class Verdict(BaseModel):
    """Body of ``POST /feedback/{id}/resolve``."""

    model_config = ConfigDict(extra="forbid")

    accept: bool
    reason: str = Field(min_length=1, max_length=500)


class Quarantine(BaseModel):
    """Body of ``POST /sources/{name}/quarantine``."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500)


@contextmanager
def answered() -> Iterator[None]:
    """Turn the store's refusals into HTTP answers: unknown id 404, a used or text-less label 409, a bad source
    name or a label nobody allowed 422."""
    try:
        yield
    except FeedbackNotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except FeedbackConflictError as exc:
        raise HTTPException(409, str(exc)) from exc
    except (InvalidSourceError, UnknownLabelError) as exc:
        raise HTTPException(422, str(exc)) from exc


def parse_feedback_body(body: bytes, settings: Settings) -> FeedbackCreate:
    """A ``POST /feedback`` body, or BadRequestError or HTTPException saying what is wrong with it."""
    data = parse_json_object(body, EXAMPLE)
    try:
        create = FeedbackCreate.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(422, describe_validation_errors(exc.errors())) from exc
    if create.comment is not None and len(create.comment) > settings.feedback_max_comment_chars:
        raise HTTPException(
            422, f"comment is {len(create.comment)} characters; at most {settings.feedback_max_comment_chars} allowed"
        )
    if create.text is not None and len(create.text) > settings.max_text_chars:
        raise HTTPException(422, f"text is {len(create.text)} characters; at most {settings.max_text_chars} allowed")
    return create


def create_router(
    settings: Settings,
    database: BackgroundDatabase,
    publisher: EventPublisher,
    serving: Callable[[], ModelVersion | None],
    access: Access,
) -> APIRouter:
    """The feedback routes for one service worker (see ``service.app`` for the contract)."""
    executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="feedback-db")
    parts: dict[int, Backend] = {}
    dropped = admission_metrics().dropped

    def drop(reason: str) -> None:
        dropped.labels(route="feedback", reason=reason).inc()

    def model_labels() -> list[str] | None:
        # The model serving now: a label it has is stored without a trip to the label table.
        model = serving()
        return None if model is None else model.card.labels

    def backend_of(db: Annotated[Database, Depends(database.get)]) -> Backend:
        # Built once per opened database (there is one per process): the store prepares statements up front.
        if id(db) not in parts:
            store = FeedbackStore(db, settings, model_labels=model_labels)
            parts[id(db)] = Backend(
                store,
                ReviewQueue(db, settings),
                RateLimiter(db, settings),
                SubmissionQueue(store, settings.feedback_commit_ms, on_drop=drop),
            )
        return parts[id(db)]

    async def in_thread(function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, partial(function, *args))

    throughput = Throughput()
    admission = Admission(
        "feedback",
        "requests",
        sized_limit(
            settings.feedback_max_in_flight,
            throughput,
            min(settings.admission_queue_seconds, settings.serve_timeout),
            MIN_IN_FLIGHT,
            MAX_IN_FLIGHT,
        ),
        throughput,
    )
    admission.publish()

    async def admitted_work(
        request: Request, deadline: float, spent: list[float], function: Callable[..., T], *args: Any
    ) -> T:
        """``function(*args)`` on a database thread, unless the client leaves or ``deadline`` passes before it runs;
        the seconds it took are appended to ``spent``."""
        started: list[float] = []

        def run() -> T:
            if time.monotonic() > deadline:
                dropped.labels(route="feedback", reason="expired").inc()
                raise DeadlineExceededError(
                    "the request waited for the database past its deadline (FLYWHEEL_SERVE_TIMEOUT)"
                )
            started.append(time.perf_counter())
            try:
                return function(*args)
            finally:
                spent.append(time.perf_counter() - started[0])

        try:
            return await unless_disconnected(request, in_thread(run))
        except ClientDisconnectedError:
            if not started:
                dropped.labels(route="feedback", reason="cancelled").inc()
            raise

    body_limit = (settings.max_text_chars + settings.feedback_max_comment_chars) * _BYTES_PER_CHAR + _BODY_OVERHEAD
    router = APIRouter(tags=["feedback"])
    errors: dict[int | str, dict[str, Any]] = {
        status: {"description": text, "content": {"application/json": {"example": {"detail": "..."}}}}
        for status, text in (
            (400, "Body is not JSON."),
            (404, "No feedback with this id."),
            (409, "The label was already used for training, or its prediction has not arrived."),
            (413, "Body too large."),
            (422, "Invalid body, or a label the serving model does not know."),
            (401, "API key missing, wrong or revoked."),
            (403, "The key lacks the role, or a browser session without its CSRF token."),
            (429, "Too much feedback from this principal; see Retry-After."),
            (
                503,
                "No model loaded yet, the feedback store is unreachable, or the worker is at capacity (admission "
                "control): retry after Retry-After seconds.",
            ),
            (504, "The request waited for the database past FLYWHEEL_SERVE_TIMEOUT and was not stored."),
        )
    }

    @router.post(
        "/feedback",
        status_code=202,
        response_model=FeedbackPublic,
        responses=errors,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackCreate.model_json_schema()}},
            }
        },
    )
    async def post_feedback(
        request: Request,
        caller: Annotated[Caller, Depends(access.require(Role.CLIENT))],
        backend: Annotated[Backend, Depends(backend_of)],
    ) -> JSONResponse:
        """Correct a prediction (``prediction_id``) or label a new text (``text``); answers 202 with its id.

        The label belongs to the calling principal; a ``source`` in the body is kept as a note only.
        """
        deadline = time.monotonic() + settings.serve_timeout
        ticket = admission.ticket()
        try:
            # Admitted before the body is read: a refused request costs neither its bytes nor a database call.
            admission.admit_work(ticket, caller.name, 1)
            try:
                body = await read_body(request, body_limit, "feedback")
            except ClientDisconnectedError:
                dropped.labels(route="feedback", reason="cancelled").inc()
                raise
            create = parse_feedback_body(body, settings)
            if serving() is None:
                raise HTTPException(503, "no model is loaded yet, so its labels are unknown; retry shortly")
            spent: list[float] = []
            # Without a limit there is nothing to count: no trip to a database thread.
            limited = backend.limiter.limit(caller.role) > 0
            wait = (
                await admitted_work(request, deadline, spent, backend.limiter.acquire, caller.name, caller.role)
                if limited
                else 0.0
            )
            if wait > 0:
                raise HTTPException(
                    429,
                    f"{caller.name!r} sent more than {backend.limiter.limit(caller.role)} feedback requests this "
                    f"minute; retry in {wait:.0f}s",
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
            share: list[float] = []
            with answered():
                # Dropped unwritten (and counted) by the queue when the client leaves or the deadline passes first.
                saved = await unless_disconnected(
                    request, backend.submissions.submit(create, caller.name, deadline, share)
                )
            # The pool runs DB_THREADS rate-limit counts at once; the one writer thread a transaction at a time, of
            # which this request took its share.
            throughput.observe(1, sum(spent) / DB_THREADS + sum(share))
        finally:
            ticket.release()
        publisher.publish(feedback_event(saved))
        return JSONResponse(saved.model_dump(mode="json"), status_code=202)

    @router.get(
        "/feedback/{feedback_id}", response_model=FeedbackPublic, responses={404: errors[404], 503: errors[503]}
    )
    async def get_feedback(
        feedback_id: str,
        caller: Annotated[Caller, Depends(access.require(Role.CLIENT))],
        backend: Annotated[Backend, Depends(backend_of)],
    ) -> FeedbackPublic:
        """One piece of feedback with its status, reason and vetting scores: one's own, or any for a reviewer."""
        with answered():
            found = await in_thread(backend.store.get, feedback_id)
        if found.source != caller.name and not caller.may(Role.REVIEWER, read_only=True):
            # The same answer as for an unknown id: a client learns nothing about other principals' labels.
            raise HTTPException(404, f"no feedback {feedback_id!r}")
        return found

    decided: dict[int | str, dict[str, Any]] = {code: errors[code] for code in (404, 409, 503)}

    @router.post("/feedback/{feedback_id}/confirm", response_model=FeedbackPublic, responses=decided)
    async def confirm_feedback(
        feedback_id: str,
        caller: Annotated[Caller, Depends(access.require(Role.REVIEWER))],
        backend: Annotated[Backend, Depends(backend_of)],
    ) -> FeedbackPublic:
        """Vouch for a held or untrusted label: it is accepted and counts as trusted (audited)."""
        with answered():
            return await in_thread(backend.store.confirm, feedback_id, caller.name)

    @router.post("/feedback/{feedback_id}/resolve", response_model=FeedbackPublic, responses=decided)
    async def resolve_feedback(
        feedback_id: str,
        verdict: Verdict,
        caller: Annotated[Caller, Depends(access.require(Role.REVIEWER))],
        backend: Annotated[Backend, Depends(backend_of)],
    ) -> FeedbackPublic:
        """Accept or reject a label, with the reason for the record (audited)."""
        with answered():
            return await in_thread(backend.store.resolve, feedback_id, verdict.accept, verdict.reason, caller.name)

    sourced: dict[int | str, dict[str, Any]] = {code: errors[code] for code in (422, 503)}
    reviewer = Annotated[Caller, Depends(access.require(Role.REVIEWER))]

    async def change_source(backend: Backend, name: str, caller: Caller, **change: Any) -> FeedbackSourcePublic:
        with answered():
            return await in_thread(partial(backend.store.set_source, name, actor=caller.name, **change))

    # Source names may contain "/" (principal names do), hence the path converters.
    @router.post("/sources/{name:path}/trust", response_model=FeedbackSourcePublic, responses=sourced)
    async def trust_source(
        name: str, caller: reviewer, backend: Annotated[Backend, Depends(backend_of)]
    ) -> FeedbackSourcePublic:
        """Accept a source's labels without the evidence checks, its open labels included (audited)."""
        return await change_source(backend, name, caller, trusted=True)

    @router.post("/sources/{name:path}/distrust", response_model=FeedbackSourcePublic, responses=sourced)
    async def distrust_source(
        name: str, caller: reviewer, backend: Annotated[Backend, Depends(backend_of)]
    ) -> FeedbackSourcePublic:
        """Vet a source's labels again, its open labels included (audited)."""
        return await change_source(backend, name, caller, trusted=False)

    @router.post("/sources/{name:path}/quarantine", response_model=FeedbackSourcePublic, responses=sourced)
    async def quarantine_source(
        name: str, body: Quarantine, caller: reviewer, backend: Annotated[Backend, Depends(backend_of)]
    ) -> FeedbackSourcePublic:
        """Hold a source's new and accepted, unused labels for review (audited)."""
        return await change_source(backend, name, caller, quarantined=True, reason=body.reason)

    @router.post("/sources/{name:path}/release", response_model=FeedbackSourcePublic, responses=sourced)
    async def release_source(
        name: str, caller: reviewer, backend: Annotated[Backend, Depends(backend_of)]
    ) -> FeedbackSourcePublic:
        """Lift a source's quarantine (audited)."""
        return await change_source(backend, name, caller, quarantined=False)

    @router.get("/review", response_model=list[ReviewItem], responses={503: errors[503]})
    async def review(
        caller: Annotated[Caller, Depends(access.require(Role.ANNOTATOR, read_only=True))],
        backend: Annotated[Backend, Depends(backend_of)],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many predictions to return.")] = 20,
    ) -> list[ReviewItem]:
        """Unlabeled recent predictions most worth a label: least confident first, near-duplicates collapsed."""
        return await in_thread(backend.queue.next, limit)

    return router
