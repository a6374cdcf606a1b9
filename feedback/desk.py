"""The annotation desk's routes: ``GET /desk`` where an annotator labels leased review items, ``GET /desk/review``
where a reviewer decides held labels, their form posts, the keyboard script, and Label Studio export and import.

Every control is an HTML form posting here with the session's CSRF token, and each answer redirects back to the
page (post/redirect/get), so the desk works without its script; the script only maps keys to those buttons. A
label given at the desk is stored by ``FeedbackStore.submit`` as the annotator's feedback, under their rate limit,
and announced on ``flywheel.feedback``, exactly as ``POST /feedback`` does.
"""

# No `from __future__ import annotations`: FastAPI reads route signatures at run time, and their dependencies
# are closures of `create_router`, which string annotations could not name.

import contextlib
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NamedTuple
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import ValidationError

from feedback.decisions import FeedbackConflictError, FeedbackNotFoundError
from feedback.desk_view import PAGE_HEADERS, Desk, ReviewPage, script
from feedback.label_studio import import_tasks, label_config, label_tasks, queue_tasks, read_tasks
from feedback.leases import ItemGoneError, Leases, LeaseTakenError
from feedback.ratelimit import RateLimiter
from feedback.review import MAX_LIMIT, ReviewQueue
from feedback.store import FeedbackStore, feedback_event
from feedback.worklog import Worklog
from flywheel.access import Caller
from flywheel.auth import API_KEY_HEADER, SESSION_COOKIE, Access
from flywheel.database import BackgroundDatabase, Database
from flywheel.errors import BadRequestError, describe_validation_errors
from flywheel.http import parse_json_object, read_body
from flywheel.label_set import LabelSet, UnknownLabelError
from flywheel.models.access import Role
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelVersion
from flywheel.settings import Settings

#: Bytes a form may take per comment character (a percent-encoded 4-byte character), plus room for the rest.
_FORM_BYTES_PER_CHAR = 12
_FORM_OVERHEAD = 4096
#: Largest Label Studio export accepted over HTTP; bigger projects go through `flywheel feedback import`.
MAX_IMPORT_BYTES = 32 * 1024 * 1024
_IMPORT_EXAMPLE = '[{"data": {"text": "..."}, "annotations": [{"result": [{"type": "choices", ...}]}]}]'
_NOTICES = {
    "skipped": "Skipped: that item goes back to the others and is not offered to you again.",
    "undone": "Withdrew your last label: its item is shown again.",
    "nothing": "Nothing to undo: you gave no label at the desk in this session.",
}


class Backend(NamedTuple):
    """What the desk uses of one opened database."""

    store: FeedbackStore
    queue: ReviewQueue
    desk: Desk
    limiter: RateLimiter


class Posted(NamedTuple):
    """A form post: who sent it, its fields, and the digest of the session it came from."""

    caller: Caller
    fields: dict[str, str]
    session: str


def session_digest(request: Request, caller: Caller) -> str:
    """Names the session (browser cookie, or key) a request came from without keeping the credential itself."""
    credential = (
        request.headers.get(API_KEY_HEADER)
        or request.headers.get("authorization")
        or request.cookies.get(SESSION_COOKIE)
        or caller.name
    )
    return hashlib.sha256(f"desk|{credential}".encode()).hexdigest()[:32]


def create_router(
    settings: Settings,
    database: BackgroundDatabase,
    publisher: EventPublisher,
    serving: Callable[[], ModelVersion | None],
    access: Access,
) -> APIRouter:
    """The desk's routes for one service worker (see ``service.app`` for the contract)."""
    parts: dict[int, Backend] = {}
    form_limit = settings.feedback_max_comment_chars * _FORM_BYTES_PER_CHAR + _FORM_OVERHEAD

    def model_labels() -> list[str] | None:
        model = serving()
        return None if model is None else model.card.labels

    def backend_of(db: Annotated[Database, Depends(database.get)]) -> Backend:
        if id(db) not in parts:
            store = FeedbackStore(db, settings, model_labels=model_labels)
            queue = ReviewQueue(db, settings)
            leases = Leases(db, settings.desk_lease_seconds)
            parts[id(db)] = Backend(
                store, queue, Desk(store, queue, leases, Worklog(store, leases)), RateLimiter(db, settings)
            )
        return parts[id(db)]

    def signed_in(role: Role) -> Callable[[Request], Awaitable[Caller | None]]:
        check = access.require(role)

        async def dependency(request: Request) -> Caller | None:
            try:
                return await check(request)
            except HTTPException as exc:
                # A browser without a session is sent to log in (and back); a wrong key is still refused.
                if exc.status_code == 401 and API_KEY_HEADER not in request.headers:
                    return None
                raise

        return dependency

    def posted_by(role: Role) -> Callable[[Request], Awaitable[Posted]]:
        check = access.require_form(role, form_limit)

        async def dependency(request: Request) -> Posted:
            caller, fields = await check(request)
            return Posted(caller, fields, session_digest(request, caller))

        return dependency

    def csrf_of(request: Request) -> str:
        cookie = request.cookies.get(SESSION_COOKIE)
        by_cookie = cookie and API_KEY_HEADER not in request.headers and "authorization" not in request.headers
        return access.signer.csrf_token(cookie) if by_cookie and cookie else ""

    def labels_of(backend: Backend) -> list[str]:
        model = serving()
        if model is None:
            raise HTTPException(503, "no model is loaded yet, so its labels are unknown; reload this page shortly")
        added = LabelSet(backend.store.database).added_names()
        return [*model.card.labels, *(name for name in added if name not in model.card.labels)]

    async def desk_page(
        request: Request, caller: Caller, backend: Backend, *, notice: str = "", error: str = "", status: int = 200
    ) -> Response:
        labels = await run_in_threadpool(labels_of, backend)
        page = await run_in_threadpool(
            backend.desk.page, caller, csrf_of(request), labels, settings.feedback_max_comment_chars
        )
        html = dataclasses.replace(page, notice=notice, error=error).html()
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    async def review_page(
        request: Request, caller: Caller, backend: Backend, *, notice: str = "", error: str = "", status: int = 200
    ) -> Response:
        held = await run_in_threadpool(backend.desk.held)
        html = ReviewPage(caller, csrf_of(request), held, notice=notice, error=error).html()
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    def back(path: str) -> RedirectResponse:
        return RedirectResponse(path, status_code=303)

    router = APIRouter(tags=["desk"])
    annotator = Annotated[Caller | None, Depends(signed_in(Role.ANNOTATOR))]
    reviewer = Annotated[Caller | None, Depends(signed_in(Role.REVIEWER))]
    backend_dep = Annotated[Backend, Depends(backend_of)]

    @router.get("/desk", response_class=HTMLResponse, include_in_schema=False)
    async def desk(
        request: Request, caller: annotator, backend: backend_dep, saved: str = "", note: str = ""
    ) -> Response:
        """The annotator's page: the item leased to them, one button (and key) per label, skip, undo, progress."""
        if caller is None:
            return back("/login?next=/desk")
        notice = _NOTICES.get(note, "")
        if saved:
            try:
                row = await run_in_threadpool(backend.store.get, saved)
            except FeedbackNotFoundError:
                row = None
            if row is not None and row.source == caller.name:
                notice = f"Saved {row.label!r}: {row.status.value}, {row.status_reason or ''}".rstrip(", ")
        return await desk_page(request, caller, backend, notice=notice)

    @router.post("/desk/label", include_in_schema=False)
    async def desk_label(
        request: Request, posted: Annotated[Posted, Depends(posted_by(Role.ANNOTATOR))], backend: backend_dep
    ) -> Response:
        """Store the annotator's label of their item as their feedback, then show the next item."""
        caller, fields = posted.caller, posted.fields
        prediction_id, label = fields.get("prediction_id", ""), fields.get("label", "").strip()
        comment = fields.get("comment", "").strip() or None
        if not prediction_id or not label:
            return await desk_page(request, caller, backend, error="Choose a label for the item.", status=422)
        if comment is not None and len(comment) > settings.feedback_max_comment_chars:
            error = f"The comment has {len(comment)} characters; at most {settings.feedback_max_comment_chars}."
            return await desk_page(request, caller, backend, error=error, status=422)
        if serving() is None:
            raise HTTPException(503, "no model is loaded yet, so its labels are unknown; retry shortly")
        wait = await run_in_threadpool(backend.limiter.acquire, caller.name, caller.role)
        if wait > 0:
            error = f"You sent more labels this minute than your limit allows: retry in {wait:.0f}s."
            response = await desk_page(request, caller, backend, error=error, status=429)
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        try:
            saved = await run_in_threadpool(
                backend.desk.worklog.label, caller.name, posted.session, prediction_id, label, comment
            )
        except (LeaseTakenError, ItemGoneError, FeedbackConflictError) as exc:
            return await desk_page(request, caller, backend, error=f"Not stored: {exc}", status=409)
        except UnknownLabelError as exc:
            return await desk_page(request, caller, backend, error=f"Not stored: {exc}", status=422)
        except ValidationError as exc:
            error = f"Not stored: {describe_validation_errors(exc.errors())}"
            return await desk_page(request, caller, backend, error=error, status=422)
        publisher.publish(feedback_event(saved))
        return back(f"/desk?saved={quote(saved.feedback_id)}")

    @router.post("/desk/skip", include_in_schema=False)
    async def desk_skip(
        posted: Annotated[Posted, Depends(posted_by(Role.ANNOTATOR))], backend: backend_dep
    ) -> Response:
        """Pass on the item: it goes back to the others."""
        prediction_id = posted.fields.get("prediction_id", "")
        # An item already gone leaves nothing to skip: the next page shows the next item anyway.
        with contextlib.suppress(ItemGoneError):
            if prediction_id:
                await run_in_threadpool(backend.desk.worklog.skip, posted.caller.name, posted.session, prediction_id)
        return back("/desk?note=skipped")

    @router.post("/desk/undo", include_in_schema=False)
    async def desk_undo(
        request: Request, posted: Annotated[Posted, Depends(posted_by(Role.ANNOTATOR))], backend: backend_dep
    ) -> Response:
        """Withdraw the last label the annotator gave in this session; its item is shown again."""
        try:
            undone = await run_in_threadpool(backend.desk.worklog.undo, posted.caller.name, posted.session)
        except FeedbackConflictError as exc:
            return await desk_page(request, posted.caller, backend, error=f"Not undone: {exc}", status=409)
        return back("/desk?note=undone" if undone is not None else "/desk?note=nothing")

    @router.get("/desk/review", response_class=HTMLResponse, include_in_schema=False)
    async def desk_review(request: Request, caller: reviewer, backend: backend_dep, decided: str = "") -> Response:
        """The reviewer's view: held labels (possible label errors, conflicts, quarantined sources) to decide."""
        if caller is None:
            return back("/login?next=/desk/review")
        notice = ""
        if decided:
            try:
                row = await run_in_threadpool(backend.store.get, decided)
                notice = f"{row.status.value.capitalize()}: {row.label!r} from {row.source}."
            except FeedbackNotFoundError:
                notice = ""
        return await review_page(request, caller, backend, notice=notice)

    @router.post("/desk/review/{feedback_id}", include_in_schema=False)
    async def desk_decide(
        request: Request,
        feedback_id: str,
        posted: Annotated[Posted, Depends(posted_by(Role.REVIEWER))],
        backend: backend_dep,
    ) -> Response:
        """Accept (as confirmed by this reviewer) or reject a held label, with a reason for the record (audited)."""
        verdict, reason = posted.fields.get("verdict", ""), posted.fields.get("reason", "").strip()
        if verdict not in ("accept", "reject"):
            return await review_page(request, posted.caller, backend, error="Choose accept or reject.", status=422)
        accept = verdict == "accept"
        reason = (reason or ("confirmed at the desk" if accept else "rejected at the desk"))[:500]
        try:
            row = await run_in_threadpool(backend.store.resolve, feedback_id, accept, reason, posted.caller.name)
        except FeedbackNotFoundError as exc:
            return await review_page(request, posted.caller, backend, error=str(exc), status=404)
        except FeedbackConflictError as exc:
            return await review_page(request, posted.caller, backend, error=str(exc), status=409)
        return back(f"/desk/review?decided={quote(row.feedback_id)}")

    @router.get("/desk/desk.js", include_in_schema=False)
    async def desk_script() -> Response:
        """The keyboard script: public, like any static file; it holds no data."""
        return Response(
            script(),
            media_type="text/javascript; charset=utf-8",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    admin = [Depends(access.require(Role.ADMIN))]

    @router.get("/desk/label-studio/tasks", dependencies=admin)
    async def label_studio_tasks(
        backend: backend_dep,
        what: Annotated[str, Query(pattern="^(queue|labels)$", description="The review queue, or stored labels.")],
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Queue items to export.")] = 100,
    ) -> JSONResponse:
        """Label Studio tasks: queue items with the model's guess as a prediction, or labels as annotations."""
        if what == "queue":
            items = await run_in_threadpool(backend.queue.next, limit)
            return JSONResponse(queue_tasks(items))
        return JSONResponse(await run_in_threadpool(lambda: label_tasks(backend.store.export())))

    @router.get("/desk/label-studio/config", dependencies=admin, response_class=PlainTextResponse)
    async def label_studio_config(backend: backend_dep) -> PlainTextResponse:
        """The Label Studio labelling configuration the exported tasks fit (the serving model's labels)."""
        labels = await run_in_threadpool(labels_of, backend)
        return PlainTextResponse(label_config(labels), media_type="application/xml")

    @router.post("/desk/label-studio/annotations")
    async def label_studio_import(
        request: Request,
        caller: Annotated[Caller, Depends(access.require(Role.ADMIN))],
        backend: backend_dep,
    ) -> dict[str, Any]:
        """Import a Label Studio JSON export: each task's newest annotation becomes a label of the calling admin."""
        body = await read_body(request, MAX_IMPORT_BYTES, "Label Studio export")
        if not body.strip():
            raise BadRequestError(400, f"request body is empty; send a Label Studio JSON export like {_IMPORT_EXAMPLE}")
        # The strict parser reads objects; an export is a list, read as the value of one.
        data = parse_json_object(b'{"tasks": ' + body + b"}", _IMPORT_EXAMPLE)["tasks"]
        labels = await run_in_threadpool(labels_of, backend)
        tasks = read_tasks(data, labels, settings.max_text_chars)
        result = await run_in_threadpool(
            import_tasks, backend.store, tasks, caller.name, lambda saved: publisher.publish(feedback_event(saved))
        )
        return {**result.model_dump(), "unannotated": tasks.unannotated, "problems": tasks.problems}

    return router
