"""Support for tenacity retry loops: waits that end at shutdown, and what the failed attempt raised."""

from __future__ import annotations

import threading
from collections.abc import Callable

from tenacity import RetryCallState


def wait_on(event: threading.Event) -> Callable[[float], None]:
    """A tenacity ``sleep`` that returns as soon as ``event`` is set, so a stop request ends the wait at once."""

    def sleep(seconds: float) -> None:
        event.wait(seconds)

    return sleep


def failure(state: RetryCallState) -> BaseException:
    """The exception of the attempt that just failed; for ``before_sleep`` callbacks of exception-driven retries."""
    error = state.outcome.exception() if state.outcome is not None else None
    assert error is not None, "before_sleep runs only after a failed attempt"
    return error
