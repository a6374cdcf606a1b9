"""HTTP helpers every package shares: capped body reads and strict JSON parsing for routes, and waiting for a
server to become ready."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import httpx
import numpy as np
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from flywheel.errors import BadRequestError, FlywheelError

#: Deepest nesting of arrays and objects a JSON body may have. No route's valid body nests more than 2 levels
#: (``{"texts": [...]}``); bodies nested 1,000 deep made the parser raise RecursionError (a 500), and checking the
#: depth first costs one pass over the bytes and keeps the parser far from the interpreter's recursion limit.
MAX_JSON_DEPTH = 16
#: Longest number literal a body may hold: no field takes a number, and ``int()`` refuses (ValueError) or takes
#: quadratic time over long digit strings.
MAX_NUMBER_CHARS = 100
# Depth each byte adds outside strings: +1 opening an array or object, -1 closing one.
_STEPS = np.zeros(256, dtype=np.int8)
_STEPS[list(b"[{")] = 1
_STEPS[list(b"]}")] = -1
_SCAN_CHUNK = 1 << 20
#: Pause between reads of a server that reports something other than a disconnect after the body (none should).
_RECEIVE_PAUSE = 0.05
T = TypeVar("T")


class ClientDisconnectedError(FlywheelError):
    """The client closed its connection before its answer was ready; the work it asked for was dropped."""


async def read_body(
    request: Request, limit: int, what: str, reserve: Callable[[int], None] | None = None
) -> bytes:
    """The whole body, or 413 as soon as the declared or received size passes ``limit`` bytes.

    Refusing on the way in keeps an oversized body from being held in memory whole. ``reserve`` is called with the
    declared size before anything is read (or with each chunk's size when none is declared) and may raise to
    refuse the request before its bytes are held (admission control).
    """
    declared = request.headers.get("content-length", "")
    known = declared.isdigit()
    if known and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes is larger than any valid {what} ({limit} bytes)")
    if known and reserve is not None:
        reserve(int(declared))
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body is larger than any valid {what} ({limit} bytes)")
            if not known and reserve is not None:
                reserve(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientDisconnectedError("the client disconnected while sending its body") from exc
    return b"".join(chunks)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, once its body has been read; if the client disconnects first, ``work`` is cancelled
    (so queued work is dropped before compute) and :class:`ClientDisconnectedError` raised.

    Cancelling the caller (a request timeout) cancels ``work`` too.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnectedError("the client disconnected before its answer was ready")
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    # Once the body is read, an ASGI server's receive() returns only when the client has gone (or the answer went).
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(_RECEIVE_PAUSE)


def parse_json_object(body: bytes, example: str) -> dict[str, Any]:
    """A request body that is one JSON object, read strictly; BadRequestError says what is wrong otherwise.

    400 for what is not JSON: empty, not UTF-8 (a UTF-8 BOM or UTF-16 included), malformed, or nested deeper than
    ``MAX_JSON_DEPTH``. 422 for JSON that cannot mean one request: a key twice in one object, ``NaN`` or
    ``Infinity`` or a number over ``MAX_NUMBER_CHARS`` characters, a string holding a NUL character or half of a
    surrogate pair (``"\\ud800"``: not a Unicode character, so it cannot be stored, logged or tokenized), or a value
    other than an object. ``example`` is a valid body, quoted in the messages.
    """
    if not body.strip():
        raise BadRequestError(400, f"request body is empty; send JSON like {example}")
    try:
        # Decoded here, strictly: json.loads(bytes) would also take UTF-16 and let UTF-8-encoded surrogates through.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(400, f"request body is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    if _too_deep(body):
        raise BadRequestError(
            400, f"request body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep; send {example}"
        )
    try:
        data = json.loads(
            text, object_pairs_hook=_unique_keys, parse_constant=_not_finite, parse_float=_float, parse_int=_int
        )
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            400, f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    if not isinstance(data, dict):
        raise BadRequestError(422, f"request body must be a JSON object, got {json_kind(data)}; send {example}")
    _check_strings(data)
    return data


def json_kind(value: object) -> str:
    """What a parsed JSON value is, as a client would name it: "a string", "a list", "null", ..."""
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _too_deep(body: bytes) -> bool:
    """Whether arrays and objects nest deeper than ``MAX_JSON_DEPTH`` in ``body``: vectorised, linear, no recursion."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False  # the common case: too few brackets to nest too deep, in strings or not
    # Escapes never end a string: drop escaped backslashes, then escaped quotes; each quote left opens or closes one.
    plain = np.frombuffer(body.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    depth = quotes = 0
    # In chunks, carrying depth and quote count, so the arrays stay small whatever the body's size.
    for start in range(0, len(plain), _SCAN_CHUNK):
        chunk = plain[start : start + _SCAN_CHUNK]
        seen = np.cumsum(chunk == ord('"'), dtype=np.int64) + quotes  # quotes up to each byte: odd inside a string
        levels = np.cumsum(np.where(seen % 2 == 1, 0, _STEPS[chunk]), dtype=np.int64) + depth
        if levels.max() > MAX_JSON_DEPTH:
            return True
        depth, quotes = int(levels[-1]), int(seen[-1])
    return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) < len(pairs):
        twice = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise BadRequestError(422, f"request body has the key {twice!r} twice in one object; send each field once")
    return data


def _not_finite(literal: str) -> NoReturn:
    raise BadRequestError(
        422, f"request body contains {literal}, which is not a finite number; JSON has no NaN or Infinity"
    )


def _float(literal: str) -> float:
    value = float(_short(literal))
    if not math.isfinite(value):
        _not_finite(literal[:20])
    return value


def _int(literal: str) -> int:
    return int(_short(literal))


def _short(literal: str) -> str:
    if len(literal) > MAX_NUMBER_CHARS:
        raise BadRequestError(
            422, f"request body contains a number of {len(literal)} characters, more than {MAX_NUMBER_CHARS}"
        )
    return literal


def _check_strings(data: dict[str, Any]) -> None:
    """Refuse strings, keys included, that hold a NUL character or a lone surrogate; iterative, whatever the depth."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            _check_string(where, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                # Checked before it names anything: a message quoting a surrogate could not be encoded (a 500).
                _check_string(f"a key of {where or 'the body'}", key)
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))


def _check_string(where: str, value: str) -> None:
    if "\x00" in value:
        position = value.index("\x00")
        raise BadRequestError(422, f"{where} contains a NUL character (\\u0000) at character {position}; remove it")
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequestError(
            422,
            f"{where} contains {ascii(value[exc.start])[1:-1]} at character {exc.start}: half of a UTF-16 surrogate "
            "pair without its other half, which is not a Unicode character; send valid UTF-8 text",
        ) from exc


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
