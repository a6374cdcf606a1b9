"""Access control for the HTTP API: a bearer token for admin routes, optional API keys for clients."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Header, HTTPException

from flywheel.settings import Settings

API_KEY_HEADER = "X-API-Key"


def _matches(given: str, expected: str) -> bool:
    # Constant time, so response timing does not reveal how much of a guess was right.
    return hmac.compare_digest(given.encode(), expected.encode())


def admin_guard(settings: Settings) -> Callable[[str | None], None]:
    """FastAPI dependency: 403 when no admin token is configured, 401 without the right bearer token."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else None

    def require_admin(authorization: str | None = Header(default=None)) -> None:
        if not token:
            raise HTTPException(403, "admin endpoints are disabled: set FLYWHEEL_ADMIN_TOKEN to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given or not _matches(given.strip(), token):
            raise HTTPException(
                401, "admin token missing or wrong: send `Authorization: Bearer <FLYWHEEL_ADMIN_TOKEN>`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_admin


def verify_api_key(settings: Settings, given: str | None) -> None:
    """With FLYWHEEL_API_KEYS set, raise 401 unless ``given`` is one of them."""
    keys = [key.get_secret_value() for key in settings.api_keys]
    if not keys:
        return
    # Compare against every key so the time taken does not depend on which one matched.
    matched = [_matches(given or "", key) for key in keys]
    if not given or not any(matched):
        raise HTTPException(
            401,
            f"API key missing or wrong: send a key from FLYWHEEL_API_KEYS in the {API_KEY_HEADER} header",
            headers={"WWW-Authenticate": "ApiKey"},
        )


def api_key_guard(settings: Settings) -> Callable[[str | None], None]:
    """FastAPI dependency form of :func:`verify_api_key`."""

    def require_api_key(x_api_key: str | None = Header(default=None)) -> None:
        verify_api_key(settings, x_api_key)

    return require_api_key
