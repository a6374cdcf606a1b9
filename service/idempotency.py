"""Idempotent retries of ``POST /predict``: the same ``Idempotency-Key`` gets the same answer, computed and logged once.

Scope and lifetime: a key belongs to the principal that sent it (two principals' equal keys never meet) and is kept
for ``FLYWHEEL_IDEMPOTENCY_TTL_SECONDS`` in the memory of the worker process that answered it, within
``FLYWHEEL_IDEMPOTENCY_MAX_BYTES`` of kept answers (the oldest go first). So a retry is recognised when it reaches
the same worker: with several workers or replicas, route a client's retries to the one it first reached (sticky
sessions), or accept that a retry landing elsewhere is answered, and logged, anew.

Following the IETF draft "The Idempotency-Key HTTP Header Field": the key with a different body is 422, a retry
while the first request is still being answered is 409; only successful answers are kept (a refused or failed
request may be retried with its key and is then computed).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flywheel.errors import BadRequestError

HEADER = "idempotency-key"
#: Longest key accepted; UUIDs (the usual choice) take 36 characters.
MAX_KEY_CHARS = 255


@dataclass
class _Entry:
    digest: bytes
    #: The answer's body once it is ready; None while the first request is being answered.
    body: bytes | None
    expires: float


class IdempotencyCache:
    """Successful answers by (principal, key), with the body digest each was computed for."""

    def __init__(self, ttl: float, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0

    async def answer(
        self, principal: str, key: str, body: bytes, compute: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, bool]:
        """The answer for ``key`` (and whether it was replayed): the kept one, or ``compute()``'s, kept once done."""
        check_key(key)
        digest = hashlib.sha256(body).digest()
        now = time.monotonic()
        self._expire(now)
        slot = (principal, key)
        found = self._entries.get(slot)
        if found is not None:
            if found.digest != digest:
                raise BadRequestError(
                    422,
                    "this Idempotency-Key was already used with a different body; use a new key for a new request",
                )
            if found.body is None:
                raise BadRequestError(
                    409, "a request with this Idempotency-Key is still being answered; retry it in a moment"
                )
            return found.body, True
        mine = self._entries[slot] = _Entry(digest, None, now + self.ttl)
        try:
            answer = await compute()
        except BaseException:
            # Not kept: a refused, failed or cancelled request is computed again when retried.
            if self._entries.get(slot) is mine:
                del self._entries[slot]
            raise
        if self._entries.get(slot) is mine:
            mine.body = answer
            self._bytes += len(answer)
            self._shrink()
        return answer, False

    def _expire(self, now: float) -> None:
        # Entries are in insertion order and share one TTL, so the expired ones are at the front.
        while self._entries:
            slot, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            self._forget(slot)

    def _shrink(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            self._forget(next(iter(self._entries)))

    def _forget(self, slot: tuple[str, str]) -> None:
        entry = self._entries.pop(slot)
        if entry.body is not None:
            self._bytes -= len(entry.body)


def check_key(key: str) -> None:
    """Refuse (400) a key that is empty, too long, or not printable ASCII."""
    if not key or len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise BadRequestError(
            400, f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters, e.g. a UUID"
        )
