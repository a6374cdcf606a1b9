"""Principals, their API keys and the audit log: who is calling, and the record of who changed what.

A key is 32 random bytes shown once; only its SHA-256 is stored (a fast hash is enough for a random secret of
that length, and lets a key be looked up by its hash). Keys in ``FLYWHEEL_API_KEYS`` keep working as ``client``
principals named ``env-key-<n>``; the admin bearer token is a bootstrap ``admin`` called ``admin-token``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, select

from flywheel.database import BackgroundDatabase, Database, DatabaseError
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.models.access import (
    AuditEntry,
    AuditEntryPublic,
    Principal,
    PrincipalPublic,
    Role,
    check_name,
)
from flywheel.settings import AccessSettings

logger = logging.getLogger(__name__)

#: Name of the caller when no key was sent and none is needed (local development).
ANONYMOUS = "anonymous"
#: Name of the bootstrap admin that authenticates with ``FLYWHEEL_ADMIN_TOKEN``.
ADMIN_TOKEN_PRINCIPAL = "admin-token"
#: Prefix of a key, so a leaked one is recognisable in logs and secret scanners.
KEY_PREFIX = "fw_"
#: Shortest key accepted from outside (a deployment secret); generated keys have 46 characters.
MIN_KEY_CHARS = 32
#: Seconds between reloads of the principal table into memory: a revocation takes effect within this long.
CACHE_SECONDS = 5.0


class AccessError(FlywheelError):
    """A key, principal or role change that cannot be made."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a principal with a role, or the anonymous caller of a deployment without keys."""

    name: str
    role: Role
    #: With no keys configured anywhere, anonymous callers may also read what reviewers read (local use).
    local_reader: bool = False

    @property
    def anonymous(self) -> bool:
        """True for the caller who sent no key."""
        return self.name == ANONYMOUS

    def may(self, needed: Role, *, read_only: bool = False) -> bool:
        """Whether this caller may do what ``needed`` may (reviewer reads are open in local mode)."""
        if self.role.allows(needed):
            return True
        return read_only and self.local_reader and Role.REVIEWER.allows(needed)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def matches(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
    return hmac.compare_digest(given.encode(), expected.encode())


class AuditLog:
    """Appends and reads audit entries."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @staticmethod
    def add(session: Session, actor: str, action: str, target: str | None = None, **detail: Any) -> None:
        """Record a change inside the caller's transaction, so the change and its record commit together."""
        session.add(AuditEntry(actor=actor, action=action, target=target, detail=detail))

    def record(self, actor: str, action: str, target: str | None = None, **detail: Any) -> None:
        """Record a change in a transaction of its own."""
        with self.database.session() as session:
            self.add(session, actor, action, target, **detail)

    def recent(self, limit: int = 100, action: str | None = None) -> list[AuditEntryPublic]:
        """Newest entries first."""
        query = select(AuditEntry).order_by(col(AuditEntry.at).desc()).limit(limit)
        if action is not None:
            query = query.where(col(AuditEntry.action) == action)
        with self.database.read_session() as session:
            return [AuditEntryPublic.model_validate(row, from_attributes=True) for row in session.exec(query)]


class KeyStore:
    """Creates, lists and revokes principals' keys; every change is audited."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create(self, name: str, role: Role, actor: str, key: str | None = None) -> tuple[PrincipalPublic, str]:
        """A new principal and its key (returned once, never stored); ``key`` adopts one made elsewhere (a secret)."""
        check_name(name)
        if name in (ANONYMOUS, ADMIN_TOKEN_PRINCIPAL) or name.startswith("env-key-"):
            raise AccessError(f"{name!r} is reserved; choose another name")
        if key is not None and len(key) < MIN_KEY_CHARS:
            raise AccessError(f"a key needs at least {MIN_KEY_CHARS} characters; leave it out to get a random one")
        key = key or new_key()
        try:
            with self.database.session() as session:
                row = Principal(name=name, role=role, key_hash=hash_key(key), created_by=actor)
                session.add(row)
                AuditLog.add(session, actor, "key.create", name, role=str(role))
                session.flush()
                public = PrincipalPublic.model_validate(row, from_attributes=True)
        except IntegrityError as exc:
            raise AccessError(
                f"a principal called {name!r} exists already: revoke it first or choose another name"
            ) from exc
        return public, key

    def revoke(self, name: str, actor: str) -> PrincipalPublic:
        """Revoke the principal's key; its labels and audit entries stay."""
        with self.database.session() as session:
            row = session.get(Principal, name)
            if row is None:
                raise AccessError(f"no principal called {name!r}; `flywheel keys list` shows them")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                AuditLog.add(session, actor, "key.revoke", name)
            return PrincipalPublic.model_validate(row, from_attributes=True)

    def list(self, include_revoked: bool = True) -> list[PrincipalPublic]:
        """Every principal, oldest first."""
        query = select(Principal).order_by(col(Principal.created_at))
        if not include_revoked:
            query = query.where(col(Principal.revoked_at).is_(None))
        with self.database.read_session() as session:
            return [PrincipalPublic.model_validate(row, from_attributes=True) for row in session.exec(query)]

    def active(self) -> dict[str, tuple[str, Role]]:
        """Key hash → (name, role) of every principal whose key is not revoked."""
        with self.database.read_session() as session:
            rows = session.exec(select(Principal).where(col(Principal.revoked_at).is_(None)))
            return {row.key_hash: (row.name, Role(row.role)) for row in rows}


class Principals:
    """Resolves request credentials to callers from memory, reloading the principal table in the background.

    Authentication never waits on the database: a database outage leaves the last loaded keys working (so
    ``/predict`` stays up), and a revocation takes effect within ``CACHE_SECONDS``.
    """

    def __init__(
        self, settings: AccessSettings, database: BackgroundDatabase, refresh_seconds: float = CACHE_SECONDS
    ) -> None:
        self.settings = settings
        self.database = database
        self.refresh_seconds = refresh_seconds
        self._env_keys = {
            hash_key(key.get_secret_value()): (f"env-key-{n}", Role.CLIENT)
            for n, key in enumerate(settings.api_keys, start=1)
        }
        self._stored: dict[str, tuple[str, Role]] = {}
        self._loaded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="principals", daemon=True)

    def start(self) -> Principals:
        """Begin loading; returns at once."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reloading."""
        self._stop.set()

    def loaded(self) -> bool:
        """Whether the principal table has been read at least once."""
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float) -> bool:
        """Block until the table has been read once or ``timeout`` seconds passed; whether it was read."""
        return self._loaded.wait(timeout)

    def refresh(self) -> None:
        """Reload the principal table now."""
        try:
            self._stored = KeyStore(self.database.get()).active()
            self._loaded.set()
        except (DatabaseError, SQLAlchemyError) as exc:
            logger.debug("principals not reloaded: %s", exc)

    def keys_required(self) -> bool:
        """Once any key exists (stored or in ``FLYWHEEL_API_KEYS``), every protected route needs one.

        Until the table has been read nobody knows, so keys are required: access fails closed.
        """
        return not self._loaded.is_set() or bool(self._stored or self._env_keys)

    def by_key(self, key: str | None) -> Caller | None:
        """The caller a key belongs to; None for a missing, wrong or revoked key."""
        if not key:
            return None
        digest = hash_key(key)
        found = None
        # Look at every entry so the time taken does not depend on where (or whether) the key matched.
        for known, principal in (*self._stored.items(), *self._env_keys.items()):
            if matches(digest, known):
                found = principal
        return Caller(found[0], found[1]) if found else None

    def by_name(self, name: str) -> Caller | None:
        """The active principal called ``name`` (a browser session names one); None once its key is revoked."""
        for known_name, role in self._stored.values():
            if known_name == name:
                return Caller(known_name, role)
        return None

    def by_admin_token(self, token: str | None) -> Caller | None:
        """The bootstrap admin when ``token`` is ``FLYWHEEL_ADMIN_TOKEN``."""
        expected = self.settings.admin_token.get_secret_value() if self.settings.admin_token else None
        if not (token and expected and matches(token, expected)):
            return None
        return Caller(ADMIN_TOKEN_PRINCIPAL, Role.ADMIN)

    def anonymous(self) -> Caller:
        """The caller who sent nothing: a client, with reviewer reads while no keys exist."""
        return Caller(ANONYMOUS, Role.CLIENT, local_reader=not self.keys_required())

    def _run(self) -> None:
        while not self._loaded.is_set() and not self._stop.wait(0.2):
            self.refresh()
        if not self.keys_required():
            logger.warning(
                "no API keys exist: every caller is an anonymous client that may also read what reviewers read "
                "(fine on loopback for local development); create one with `flywheel keys create NAME --role ROLE`"
            )
        while not self._stop.wait(self.refresh_seconds):
            self.refresh()

