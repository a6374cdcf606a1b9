"""Who may do what: principals with a role and a hashed API key, and the audit log of every change of trust."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, String
from sqlmodel import Field, SQLModel

from flywheel.database.types import UTCDateTime
from flywheel.errors import FlywheelError
from flywheel.events import new_id, utcnow

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/+-]{0,63}")


class Role(StrEnum):
    """What a principal may do; each role may do everything the roles before it may."""

    CLIENT = "client"
    ANNOTATOR = "annotator"
    REVIEWER = "reviewer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in the order client < annotator < reviewer < admin."""
        return list(Role).index(self)

    def allows(self, needed: Role) -> bool:
        """Whether this role may do what ``needed`` may."""
        return self.rank >= needed.rank


class InvalidPrincipalError(FlywheelError, ValueError):
    """A principal name or role that cannot be used."""


def check_name(name: str) -> str:
    """``name`` if it is a valid principal name (1-64 characters: letters, digits, ``_ . : @ / + -``)."""
    if not _NAME.fullmatch(name):
        raise InvalidPrincipalError(
            f"invalid name {name[:70]!r}: use 1-64 letters, digits and _ . : @ / + -, starting with a letter or digit"
        )
    return name


def parse_role(value: str) -> Role:
    """The role called ``value``, or InvalidPrincipalError listing the roles."""
    try:
        return Role(value)
    except ValueError as exc:
        raise InvalidPrincipalError(f"unknown role {value!r}: use one of {', '.join(Role)}") from exc


class PrincipalBase(SQLModel):
    """A named holder of an API key."""

    name: str = Field(primary_key=True, max_length=64)
    role: str = Field(sa_type=String(16))


class Principal(PrincipalBase, table=True):
    """Only the key's SHA-256 is stored: the key itself is shown once, when it is created."""

    __tablename__ = "principal"

    key_hash: str = Field(max_length=64, unique=True, index=True)
    created_by: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PrincipalPublic(PrincipalBase):
    """A principal as `flywheel keys list` shows it."""

    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class AuditEntryBase(SQLModel):
    """Who changed what, when."""

    actor: str = Field(max_length=64, index=True)
    action: str = Field(max_length=64, index=True)
    target: str | None = Field(default=None, max_length=200)
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class AuditEntry(AuditEntryBase, table=True):
    """One change of keys, trust, quarantine, promotion or labels."""

    __tablename__ = "audit_entry"

    audit_id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)


class AuditEntryPublic(AuditEntryBase):
    """An audit entry as `flywheel audit` shows it."""

    audit_id: str
    at: datetime
