"""The model page: every registered version with its golden-holdout scores per class, the retrain run that produced
it, the champion's history and macro-F1 over versions; an admin promotes a version or rolls back from it.

``GET /models`` and ``GET /models/{version}`` need what ``/drift`` and ``/retrain/runs`` need (a reviewer, or anyone
while no key exists); a browser without a session is sent to ``/login`` and back. ``POST /models/{version}/promote``
and ``POST /models/rollback`` need an admin: a browser session's form carries its CSRF token, an API client sends its
key. Both move the registry's champion pointer as ``flywheel models promote`` / ``rollback`` do, audited under the
caller's name, and every serving worker loads the new champion by itself (hot reload). Pages carry no script, and
autoescape escapes every value, so labels, reasons and run texts cannot inject markup.
"""

# No `from __future__ import annotations`: FastAPI reads route signatures at run time, and their dependencies
# are closures of `create_router`, which string annotations could not name.

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.exc import InterfaceError, OperationalError

from flywheel.access import AuditLog, Caller
from flywheel.auth import API_KEY_HEADER, SESSION_COOKIE, Access
from flywheel.database import BackgroundDatabase, Database, DatabaseError
from flywheel.deployments import DeploymentStore
from flywheel.errors import RegistryError
from flywheel.models.access import Role
from flywheel.pages import page_headers, templates
from flywheel.publisher import EventPublisher
from flywheel.registry import ANY_CHAMPION, ChampionChangedError, ModelRegistry, ModelVersion, PointerChange
from flywheel.settings import Settings
from retrain.live_results import deployment_results
from retrain.model_history import POINT_COLOURS, LiveResults, ModelHistory, load_history

logger = logging.getLogger(__name__)

#: No scripts at all, no framing, nothing loaded from elsewhere; forms post only to this site.
PAGE_HEADERS = page_headers()
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Longest reason an admin may type; the pointer history keeps it.
MAX_REASON = 300
_FORM_LIMIT = 8192


@dataclass(frozen=True)
class Viewer:
    """Who looks at the page: their name and role, whether they may change the champion, and their forms' token."""

    name: str
    role: str
    anonymous: bool
    admin: bool
    csrf_token: str = ""


@dataclass(frozen=True)
class Notice:
    """A line on top of the page: what a change did (ok), why it was refused (error), or what it left out."""

    kind: Literal["ok", "error", "warning"]
    text: str


def index_page(
    history: ModelHistory,
    viewer: Viewer,
    *,
    reload_seconds: float,
    notice: Notice | None = None,
    limit: int = DEFAULT_LIMIT,
) -> str:
    """``GET /models``: the chart, the newest ``limit`` versions, the champion's history and each version's entry."""
    return (
        templates("retrain", digits=4)
        .get_template("models.html")
        .render(
            history=history,
            shown=history.newest(limit),
            viewer=viewer,
            notice=notice,
            reload_seconds=reload_seconds,
            colours=POINT_COLOURS,
        )
    )


def version_page(history: ModelHistory, version: str, viewer: Viewer) -> str:
    """``GET /models/{version}``: one version's entry with its confusion matrix; RegistryError when unknown."""
    view = history.get(version)
    if view is None:
        raise RegistryError(f"model version {version!r} not found: /models lists every version")
    template = templates("retrain", digits=4).get_template("models_version.html")
    return template.render(history=history, view=view, viewer=viewer, notice=None)


def done_notice(history: ModelHistory, action: str | None, version: str | None) -> Notice | None:
    """What the change a form just made did, said only when the newest pointer change is that change: a link with
    made-up parameters shows nothing."""
    last = history.pointer.history[-1] if history.pointer.history else None
    if action is None or last is None or (last.action, last.version) != (action, version):
        return None
    done = "promoted" if last.action == "promote" else "rolled back to"
    return Notice("ok", f"{done} {last.version} (champion before: {last.previous or 'none'}): {last.reason}")


def create_router(
    settings: Settings,
    database: BackgroundDatabase,
    publisher: EventPublisher,
    serving: Callable[[], ModelVersion | None],
    access: Access,
    *,
    live_results: LiveResults | None = deployment_results,
) -> APIRouter:
    """The model page's routes; ``live_results`` gives each version's shadow and canary results (None: none)."""
    registry = ModelRegistry(settings)
    router = APIRouter(tags=["models"])
    read = access.require(Role.REVIEWER, read_only=True)

    async def reader(request: Request) -> Caller | Response:
        """The caller, or a redirect to the login page for a browser that sent no credentials (or an expired one)."""
        try:
            return await read(request)
        except HTTPException as exc:
            sent = API_KEY_HEADER in request.headers or "authorization" in request.headers
            if exc.status_code != 401 or sent:
                raise
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    admin = access.require_form(Role.ADMIN, _FORM_LIMIT)

    def viewer(request: Request, caller: Caller) -> Viewer:
        is_admin = caller.may(Role.ADMIN)
        cookie = request.cookies.get(SESSION_COOKIE, "")
        token = access.signer.csrf_token(cookie) if is_admin and cookie else ""
        return Viewer(caller.name, caller.role, caller.anonymous, is_admin, token)

    async def history(db: Database) -> ModelHistory:
        return await run_in_threadpool(load_history, registry, db, live_results)

    async def page(request: Request, caller: Caller, db: Database, notice: Notice, status: int) -> HTMLResponse:
        html = index_page(
            await history(db), viewer(request, caller), reload_seconds=settings.reload_interval, notice=notice
        )
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    async def recorded(request: Request, caller: Caller, db: Database, moved: PointerChange, note: str) -> Response:
        """Audit the change made, then back to the page, which says what happened."""
        action = f"model.{moved.action}"
        try:
            await run_in_threadpool(
                AuditLog(db).record, caller.name, action, moved.version, previous=moved.previous, reason=note
            )
            if moved.action == "promote":
                # A promoted shadow or canary has done its work: its phase ends as promoted, as the CLI ends it.
                await run_in_threadpool(DeploymentStore(db).finish_promoted, moved.version, caller.name)
        except (DatabaseError, OperationalError, InterfaceError) as exc:
            # The pointer moved already; say plainly that this change is missing from the audit log.
            logger.warning("%s %s by %s not written to the audit log: %s", action, moved.version, caller.name, exc)
            warning = f"{moved.version} is the champion now, but the change is not in the audit log: {exc}"
            return await page(request, caller, db, Notice("warning", warning), 200)
        target = f"/models?done={moved.action}&version={quote(moved.version)}"
        return RedirectResponse(target, status_code=303)

    def reason(verb: str, caller: Caller, fields: dict[str, str]) -> tuple[str, str]:
        note = " ".join(fields.get("reason", "").split())[:MAX_REASON]
        return note, f"{verb} on the model page by {caller.name}" + (f": {note}" if note else "")

    @router.get("/models", response_class=HTMLResponse)
    async def models_index(
        request: Request,
        done: Annotated[Literal["promote", "rollback"] | None, Query(description="The change just made.")] = None,
        version: Annotated[str | None, Query(max_length=64, description="The version it made champion.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="How many versions to list.")] = DEFAULT_LIMIT,
    ) -> Response:
        """Page for people: every version's holdout scores, its run and decision, the champion's history, a chart."""
        caller = await reader(request)
        if isinstance(caller, Response):
            return caller
        loaded = await history(database.get())
        html = index_page(
            loaded,
            viewer(request, caller),
            reload_seconds=settings.reload_interval,
            notice=done_notice(loaded, done, version),
            limit=limit,
        )
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @router.get("/models/{version}", response_class=HTMLResponse, responses={404: {"description": "No such version."}})
    async def model_version(request: Request, version: str) -> Response:
        """One version's page: its card, scores per class, confusion matrix, and the run that produced it."""
        caller = await reader(request)
        if isinstance(caller, Response):
            return caller
        try:
            html = version_page(await history(database.get()), version, viewer(request, caller))
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from exc
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @router.post("/models/{version}/promote", responses={303: {"description": "Promoted; back to /models."}})
    async def promote(request: Request, version: str) -> Response:
        """Make ``version`` the champion (form fields: ``csrf_token``, ``expected`` the champion seen, ``reason``)."""
        caller, fields = await admin(request)
        db = database.get()
        note, why = reason("promoted", caller, fields)
        expected = (fields["expected"] or None) if "expected" in fields else ANY_CHAMPION
        try:
            moved = await run_in_threadpool(registry.promote, version, why, expected=expected)
        except ChampionChangedError as exc:
            text = f"nothing promoted: the champion changed to {exc.actual or 'none'} since the page was loaded"
            return await page(request, caller, db, Notice("error", text), 409)
        except RegistryError as exc:
            return await page(request, caller, db, Notice("error", f"nothing promoted: {exc}"), 404)
        return await recorded(request, caller, db, moved, note)

    @router.post("/models/rollback", responses={303: {"description": "Rolled back; back to /models."}})
    async def rollback(request: Request) -> Response:
        """Restore the champion before the current one (form fields: ``csrf_token``, ``expected``, ``reason``)."""
        caller, fields = await admin(request)
        db = database.get()
        note, why = reason("rolled back", caller, fields)
        current = await run_in_threadpool(registry.champion)
        if "expected" in fields and (fields["expected"] or None) != current:
            text = f"nothing rolled back: the champion changed to {current or 'none'} since the page was loaded"
            return await page(request, caller, db, Notice("error", text), 409)
        try:
            moved = await run_in_threadpool(registry.rollback, why)
        except RegistryError as exc:
            return await page(request, caller, db, Notice("error", f"nothing rolled back: {exc}"), 409)
        return await recorded(request, caller, db, moved, note)

    return router
