"""Access control for the HTTP API: every route names the role it needs, and one dependency checks it.

Credentials, in the order they are looked at: ``X-API-Key`` (a principal's key), ``Authorization: Bearer`` (the
bootstrap admin token), the browser session cookie set by the login page. A wrong or revoked credential is 401;
the right one without the role is 403; until the principal table has been read, a credential the worker cannot
check is 503 with ``Retry-After`` (it may be valid). With no keys anywhere, callers are anonymous clients that may
also read what reviewers read (local development, bound to loopback); once any key exists every protected route
needs one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import HTTPException, Request

from flywheel.access import Caller, Principals, matches
from flywheel.http import read_body
from flywheel.models.access import Role
from flywheel.sessions import SessionSigner

API_KEY_HEADER = "X-API-Key"
#: Cookie holding a browser's signed session (see ``flywheel.sessions``).
SESSION_COOKIE = "flywheel_session"
#: Header (or form field ``csrf_token``) that a state-changing request with a session cookie must carry.
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Access:
    """Builds the FastAPI dependencies that resolve and check the caller of a request."""

    def __init__(self, principals: Principals, signer: SessionSigner) -> None:
        self.principals = principals
        self.signer = signer

    def caller(self, request: Request) -> Caller:
        """Who sent ``request``; 401 for credentials that match no active principal."""
        key = request.headers.get(API_KEY_HEADER)
        if key is not None:
            found = self.principals.by_key(key)
            if found is None:
                _refuse_while_loading(self.principals)
                raise _unauthorized(f"API key wrong or revoked: send a valid key in the {API_KEY_HEADER} header")
            return found
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            if self.principals.settings.admin_token is None:
                raise HTTPException(
                    403, "admin token login is disabled: set FLYWHEEL_ADMIN_TOKEN, or send an admin key in X-API-Key"
                )
            found = self.principals.by_admin_token(token.strip())
            if found is None:
                raise _unauthorized("admin token wrong: send `Authorization: Bearer <FLYWHEEL_ADMIN_TOKEN>`")
            return found
        cookie = request.cookies.get(SESSION_COOKIE)
        name = self.signer.verify(cookie) if cookie else None
        found = self.principals.by_name(name) if name else None
        if found is not None:
            # A cookie rides along with any request the browser makes, so changes need proof the page sent them.
            if request.method not in SAFE_METHODS and not matches(
                request.headers.get(CSRF_HEADER, ""), self.signer.csrf_token(cookie or "")
            ):
                raise HTTPException(403, f"missing or wrong CSRF token: send the page's token as {CSRF_HEADER}")
            return found
        return self.principals.anonymous()

    def require(self, role: Role, *, read_only: bool = False) -> Callable[[Request], Awaitable[Caller]]:
        """A dependency returning the caller once it may act as ``role``; ``read_only`` marks reviewer reads.

        A coroutine, though it awaits nothing: everything it reads is in memory (key digests, signed cookies), and
        FastAPI would run a plain function in its thread pool, a thread hop per request measured at a sixth of the
        event loop's time under load.
        """

        async def check(request: Request) -> Caller:
            caller = self.caller(request)
            # Anonymous callers are clients only while no key exists anywhere; after that they must authenticate.
            if caller.may(role, read_only=read_only) and not (caller.anonymous and self.principals.keys_required()):
                return caller
            if caller.anonymous:
                _refuse_while_loading(self.principals)
                raise _unauthorized(
                    f"this needs a {role} key: send it in the {API_KEY_HEADER} header "
                    "(an admin creates keys with `flywheel keys create NAME --role ROLE`)"
                )
            raise HTTPException(403, f"{caller.name} is a {caller.role}; this needs the {role} role")

        return check

    def require_form(
        self, role: Role, limit: int
    ) -> Callable[[Request], Awaitable[tuple[Caller, dict[str, str]]]]:
        """A dependency for HTML form posts: the caller once it may act as ``role``, and the form's fields.

        A plain form cannot send headers, so its ``csrf_token`` field stands in for the CSRF header and is checked by
        the same code as the header (a header sent as well wins). Bodies over ``limit`` bytes get 413.
        """
        check = self.require(role)

        async def posted(request: Request) -> tuple[Caller, dict[str, str]]:
            body = await read_body(request, limit, "form")
            query = parse_qs(body.decode(errors="replace"), keep_blank_values=True)
            fields = {key: values[0] for key, values in query.items()}
            if CSRF_HEADER not in request.headers:
                token = (CSRF_HEADER.lower().encode(), fields.get("csrf_token", "").encode("latin-1", "replace"))
                request = Request({**request.scope, "headers": [*request.scope["headers"], token]}, request.receive)
            return await check(request), fields

        return posted


def _refuse_while_loading(principals: Principals) -> None:
    """503 rather than 401 while the principal table has not been read: the key may be valid, nobody knows yet.

    A worker that has just started (or started during a database outage) must not tell a client its good key is
    wrong; a 503 with ``Retry-After`` sends the client, or its load balancer, to try again or elsewhere.
    """
    if not principals.loaded():
        raise HTTPException(
            503,
            "access control is still loading its keys (the database has not answered yet): retry shortly",
            headers={"Retry-After": "1"},
        )


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "ApiKey"})
