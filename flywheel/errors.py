"""Typed errors whose messages tell the user what to do; the CLI prints them on one line."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class FlywheelError(Exception):
    """Base class of errors a user can act on."""


class DatasetError(FlywheelError):
    """A training or evaluation file cannot be used."""


class RegistryError(FlywheelError):
    """A model version or the champion pointer is missing or invalid."""


class TrainingError(FlywheelError):
    """Training could not start or finish."""


class BadRequestError(FlywheelError):
    """A request the client must fix; carries the HTTP status to answer with (the app has one handler for it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def describe_validation_errors(errors: Iterable[Mapping[str, Any]], limit: int | None = None) -> str:
    """Pydantic/FastAPI validation errors as one readable line: ``where: what; where: what``.

    The one formatter behind every 422 and every rejected event, so clients see the same shape everywhere.
    ``limit`` keeps only the first few problems (a dead-lettered event needs one, not hundreds).
    """
    problems = []
    for error in errors:
        # FastAPI prefixes body fields with "body"; the client only cares about the field itself.
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(problems[:limit])
