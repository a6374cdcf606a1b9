"""HTTP helpers every package shares: capped body reads for routes, and waiting for a server to become ready."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from fastapi import HTTPException, Request
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from flywheel.errors import FlywheelError


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, or 413 as soon as the declared or received size passes ``limit`` bytes.

    Refusing on the way in keeps an oversized body from being held in memory whole.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes is larger than any valid {what} ({limit} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is larger than any valid {what} ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class NotReadyError(FlywheelError):
    """A server did not become ready in time, or its process exited first."""


def wait_until_ready(
    url: str,
    *,
    timeout: float,
    path: str = "/readyz",
    exited: Callable[[], int | None] = lambda: None,
    stop: Callable[[], bool] = lambda: False,
    context: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``url + path`` until it answers 200; the one start-up wait of ``flywheel up``, tests and benchmarks.

    ``exited`` returns the server process's exit code once it has died (it is not waited for then), ``stop``
    ends the wait early without an error (Ctrl-C during ``flywheel up``), and ``context`` supplies text for the
    error, such as the tail of the server's log.
    """

    def answered() -> bool:
        code = exited()
        if code is not None:
            raise NotReadyError(f"the server at {url} exited with code {code} before it was ready. {context()}")
        if stop():
            return True
        try:
            return httpx.get(f"{url}{path}", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    retrying = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.2), retry=retry_if_result(lambda ok: not ok))
    try:
        retrying(answered)
    except RetryError as exc:
        raise NotReadyError(f"the server at {url} was not ready after {timeout:.0f}s. {context()}") from exc
