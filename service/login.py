"""The login page: a browser exchanges an API key for a session cookie (HttpOnly, SameSite=Strict).

The forms carry a CSRF token: before login it is bound to a random nonce in its own cookie (double submit), after
login to the session itself. The key is never put in the cookie, a URL or a log line.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from flywheel.access import Caller
from flywheel.auth import SESSION_COOKIE, Access
from flywheel.http import read_body
from flywheel.pages import page_headers, templates
from flywheel.sessions import SESSION_SECONDS

CSRF_COOKIE = "flywheel_csrf"
#: Pages served with these headers: no framing, no sniffing, no scripts (the login page has none).
PAGE_HEADERS = page_headers()
_FORM_LIMIT = 8192


def _safe_next(target: str) -> str:
    # Only paths of this site: an attacker's link must not turn the login page into an open redirect.
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/drift"


def create_router(access: Access) -> APIRouter:
    """``GET /login``, ``POST /login`` and ``POST /logout``."""
    router = APIRouter(tags=["login"], include_in_schema=False)
    signer = access.signer

    def page(
        request: Request, caller: Caller | None, csrf: str, error: str = "", status: int = 200
    ) -> HTMLResponse:
        html = templates("service").get_template("login.html").render(
            caller=caller, csrf_token=csrf, error=error, next=_safe_next(request.query_params.get("next", "/drift"))
        )
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    def session_caller(request: Request) -> tuple[str, Caller] | None:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        name = signer.verify(cookie) if cookie else None
        caller = access.principals.by_name(name) if name else None
        return (cookie, caller) if caller is not None else None

    async def form(request: Request) -> dict[str, str]:
        body = await read_body(request, _FORM_LIMIT, "form")
        return {key: values[0] for key, values in parse_qs(body.decode(errors="replace")).items()}

    @router.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        """The login form, or who is logged in with a log-out button."""
        current = session_caller(request)
        if current is not None:
            return page(request, current[1], signer.csrf_token(current[0]))
        nonce = secrets.token_urlsafe(16)
        response = page(request, None, signer.csrf_token(nonce))
        response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict", secure=_https(request))
        return response

    @router.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        """Exchange a key for a session cookie, then go back to the page that asked for it."""
        fields = await form(request)
        nonce = request.cookies.get(CSRF_COOKIE, "")
        if not nonce or not secrets.compare_digest(fields.get("csrf_token", ""), signer.csrf_token(nonce)):
            raise HTTPException(403, "the login form expired or did not come from this site: reload /login")
        caller = access.principals.by_key(fields.get("key"))
        if caller is None:
            fresh = secrets.token_urlsafe(16)
            refused = page(request, None, signer.csrf_token(fresh), "That key is wrong or revoked.", status=401)
            refused.set_cookie(CSRF_COOKIE, fresh, httponly=True, samesite="strict", secure=_https(request))
            return refused
        response = RedirectResponse(_safe_next(fields.get("next", "/drift")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE, signer.issue(caller.name), max_age=int(SESSION_SECONDS),
            httponly=True, samesite="strict", secure=_https(request),
        )
        response.delete_cookie(CSRF_COOKIE)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        """End the session."""
        current = session_caller(request)
        fields = await form(request)
        if current is not None and not secrets.compare_digest(
            fields.get("csrf_token", ""), signer.csrf_token(current[0])
        ):
            raise HTTPException(403, "the log-out form did not come from this site")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    return router


def _https(request: Request) -> bool:
    return request.url.scheme == "https"
