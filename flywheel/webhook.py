"""Alerts delivered to people: each alert POSTed as JSON to ``FLYWHEEL_ALERT_WEBHOOK_URL``, retried with backoff.

The body is ``{"text": <one line>, "alert": <the event as on flywheel.alerts>}``: ``text`` is what chat webhooks
(Slack, Mattermost) show, ``alert`` what a program reads. Delivery is at least once: the header
``X-Flywheel-Event-Id`` (the event's id) lets a receiver drop a repeat. An attempt that times out, cannot connect
or is answered 5xx, 408 or 429 is tried again; once ``FLYWHEEL_ALERT_WEBHOOK_ATTEMPTS`` have failed,
``deliver`` raises, and the caller tries the alert again later rather than skip it. Only a receiver that refuses
the alert itself (any other 4xx) ends its delivery: logged as an error with the whole alert, and counted.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
)

from flywheel.errors import FlywheelError
from flywheel.events import AlertEvent, encode
from flywheel.retry import failure, wait_on
from flywheel.settings import DriftSettings

logger = logging.getLogger(__name__)

#: Statuses that say "not now" rather than "not this": the same alert may go through later.
RETRY_STATUSES = frozenset({408, 429})
#: Longest pause between two attempts, in seconds.
MAX_BACKOFF = 60.0


class WebhookError(FlywheelError):
    """The webhook did not take an alert after every attempt; the alert should be delivered again later."""


class WebhookConfigError(FlywheelError):
    """``FLYWHEEL_ALERT_WEBHOOK_URL`` is not a URL alerts can be POSTed to."""


class _AttemptFailedError(Exception):
    """One attempt failed in a way another attempt may not."""


@dataclass(frozen=True)
class WebhookMetrics:
    """Alert deliveries by kind and outcome: delivered, retried (a failed attempt, tried again), failed (the last
    attempt of a delivery; the alert is delivered again later), refused (by the receiver, for good)."""

    deliveries: Any


@functools.cache
def webhook_metrics() -> WebhookMetrics:
    """The process's webhook series, created on first use."""
    from prometheus_client import Counter

    return WebhookMetrics(
        deliveries=Counter(
            "flywheel_alert_webhook_deliveries",
            "Alert webhook outcomes by alert kind: delivered, retried (a failed attempt, tried again), failed (the "
            "last attempt of a delivery; the alert is delivered again later), refused (a 4xx other than 408/429).",
            ["kind", "outcome"],
        )
    )


class AlertWebhook:
    """POSTs alerts to one URL (its path and query may hold a secret, so only its scheme and host are logged)."""

    def __init__(
        self,
        url: str,
        timeout: float = 10.0,
        attempts: int = 5,
        backoff: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise WebhookConfigError(
                f"FLYWHEEL_ALERT_WEBHOOK_URL must be an http:// or https:// URL with a host, got one with scheme "
                f"{parts.scheme!r}"
            )
        self.url = url
        self.where = f"{parts.scheme}://{parts.netloc}"
        self.attempts = attempts
        self.backoff = backoff
        self.stop = stop or threading.Event()
        self._client = httpx.Client(timeout=timeout, follow_redirects=False)

    @classmethod
    def from_settings(cls, settings: DriftSettings, stop: threading.Event | None = None) -> AlertWebhook | None:
        """The configured webhook, or None while ``FLYWHEEL_ALERT_WEBHOOK_URL`` is unset."""
        if not settings.alert_webhook_url:
            return None
        return cls(
            settings.alert_webhook_url,
            timeout=settings.alert_webhook_timeout,
            attempts=settings.alert_webhook_attempts,
            stop=stop,
        )

    def deliver(self, event: AlertEvent, sleep: Callable[[float], None] | None = None) -> bool:
        """POST ``event``: True once the receiver took it, False when it refused it for good (logged); raises
        WebhookError when every attempt failed, or the stop event was set between them.

        ``sleep`` waits between attempts (default: until the stop event), e.g. while keeping a consumer polling.
        """
        body = json.dumps({"text": event.describe(), "alert": json.loads(encode(event))}).encode()
        headers = {"content-type": "application/json", "x-flywheel-event-id": event.event_id}
        retrying = Retrying(
            retry=retry_if_exception_type(_AttemptFailedError),
            stop=stop_after_attempt(self.attempts) | stop_when_event_set(self.stop),
            wait=wait_exponential(multiplier=self.backoff, max=MAX_BACKOFF),
            sleep=sleep or wait_on(self.stop),
            before_sleep=lambda state: self._failed_attempt(event, state),
            reraise=True,
        )
        counter = webhook_metrics().deliveries
        try:
            response = retrying(self._post, body, headers)
        except _AttemptFailedError as exc:
            counter.labels(kind=event.kind.value, outcome="failed").inc()
            raise WebhookError(
                f"alert webhook {self.where} did not take alert {event.event_id} ({exc}); it is delivered again later"
            ) from exc
        if response.is_success:
            counter.labels(kind=event.kind.value, outcome="delivered").inc()
            logger.info("alert %s (%s) delivered to %s", event.event_id, event.kind.value, self.where)
            return True
        counter.labels(kind=event.kind.value, outcome="refused").inc()
        logger.error(
            "alert webhook %s refused alert %s with HTTP %d (%s); it is not sent again: %s",
            self.where,
            event.event_id,
            response.status_code,
            response.text[:200],
            encode(event).decode(),
        )
        return False

    def _post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise _AttemptFailedError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code in RETRY_STATUSES:
            raise _AttemptFailedError(f"HTTP {response.status_code}")
        return response

    def _failed_attempt(self, event: AlertEvent, state: RetryCallState) -> None:
        webhook_metrics().deliveries.labels(kind=event.kind.value, outcome="retried").inc()
        logger.warning(
            "alert webhook %s: attempt %d of %d for alert %s failed (%s); next in %.1f s",
            self.where,
            state.attempt_number,
            self.attempts,
            event.event_id,
            failure(state),
            state.upcoming_sleep,
        )

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()
