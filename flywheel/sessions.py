"""Browser sessions: a signed, expiring cookie naming a principal, and the CSRF token its forms carry.

The cookie holds ``name|expiry`` and an HMAC of it; nothing secret is in it, and revoking the principal's key ends
the session at the next request (the name must still belong to an active principal). The signing secret is
``FLYWHEEL_SESSION_SECRET`` or, unset, a random one kept in ``<home>/secrets/session.key`` (shared by every worker
on that home).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from flywheel.storage import atomic_write_text

#: How long a login lasts.
SESSION_SECONDS = 8 * 3600


def load_secret(home: Path, configured: str | None) -> bytes:
    """The signing secret: the configured one, else the home's (created once, readable by its owner only)."""
    if configured:
        return configured.encode()
    path = home / "secrets" / "session.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        atomic_write_text(path, secrets.token_hex(32))
        os.chmod(path, 0o600)
    return path.read_text().strip().encode()


class SessionSigner:
    """Issues and checks session cookies and CSRF tokens."""

    def __init__(self, secret: bytes, lifetime: float = SESSION_SECONDS) -> None:
        self.secret = secret
        self.lifetime = lifetime

    def issue(self, name: str) -> str:
        """A cookie value for principal ``name``, valid for ``lifetime`` seconds."""
        payload = base64.urlsafe_b64encode(f"{name}|{int(time.time() + self.lifetime)}".encode()).decode()
        return f"{payload}.{self._sign(payload)}"

    def verify(self, token: str) -> str | None:
        """The principal named by a valid, unexpired cookie; None otherwise."""
        payload, _, signature = token.partition(".")
        if not payload or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            name, _, expiry = base64.urlsafe_b64decode(payload.encode()).decode().rpartition("|")
            return name if name and int(expiry) > time.time() else None
        except (ValueError, UnicodeDecodeError):
            return None

    def csrf_token(self, session_or_nonce: str) -> str:
        """The CSRF token bound to a session (or, before login, to the nonce in the CSRF cookie)."""
        return self._sign(f"csrf|{session_or_nonce}")

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()
