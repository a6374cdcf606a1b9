"""Alerts POSTed to a real loopback receiver: retried while it fails, refused alerts logged, bad URLs named."""

from __future__ import annotations

import logging

import pytest

from flywheel.events import AlertEvent, AlertKind
from flywheel.settings import Settings
from flywheel.webhook import AlertWebhook, WebhookConfigError, WebhookError
from tests.conftest import free_port, local_metric
from tests.webhook_receiver import webhook_receiver


def drift_alert() -> AlertEvent:
    return AlertEvent(report_id="r1", model_version="v2", drift_score=0.5, current_rows=300, reference_rows=900,
                      signals={"embeddings": {"score": 0.8}})  # fmt: skip


def test_an_alert_reaches_a_receiver_that_fails_its_first_attempts() -> None:
    alert = drift_alert()
    delivered = local_metric("flywheel_alert_webhook_deliveries_total", kind="drift", outcome="delivered")
    retried = local_metric("flywheel_alert_webhook_deliveries_total", kind="drift", outcome="retried")
    with webhook_receiver(statuses=[503, 500]) as receiver:
        webhook = AlertWebhook(receiver.url, timeout=5, attempts=4, backoff=0.05)
        try:
            assert webhook.deliver(alert) is True
        finally:
            webhook.close()

    assert [r.status for r in receiver.received] == [503, 500, 200]
    taken = receiver.taken()[0]
    assert taken.path == "/hooks/secret-token"
    assert taken.headers["content-type"] == "application/json"
    assert taken.headers["x-flywheel-event-id"] == alert.event_id
    assert taken.body["text"] == alert.describe()
    assert taken.body["alert"]["kind"] == "drift"
    assert taken.body["alert"]["report_id"] == "r1"
    assert taken.body["alert"]["event_id"] == alert.event_id
    # Every attempt carried the same alert, so a receiver can drop repeats by its id.
    assert {r.headers["x-flywheel-event-id"] for r in receiver.received} == {alert.event_id}
    assert local_metric("flywheel_alert_webhook_deliveries_total", kind="drift", outcome="delivered") == delivered + 1
    assert local_metric("flywheel_alert_webhook_deliveries_total", kind="drift", outcome="retried") == retried + 2


def test_a_receiver_that_keeps_failing_raises_after_the_last_attempt(caplog: pytest.LogCaptureFixture) -> None:
    with webhook_receiver(otherwise=503) as receiver:
        webhook = AlertWebhook(receiver.url, timeout=5, attempts=3, backoff=0.05)
        try:
            with pytest.raises(WebhookError, match=r"did not take alert .*HTTP 503.*delivered again later"):
                webhook.deliver(drift_alert())
        finally:
            webhook.close()

    assert len(receiver.received) == 3
    # The URL's path may be a secret (chat webhooks put their token there): the log names only its host.
    assert "secret-token" not in caplog.text


def test_an_unreachable_receiver_raises_after_the_last_attempt() -> None:
    webhook = AlertWebhook(f"http://127.0.0.1:{free_port()}/hook", timeout=2, attempts=2, backoff=0.05)
    try:
        with pytest.raises(WebhookError, match="ConnectError"):
            webhook.deliver(drift_alert())
    finally:
        webhook.close()


def test_a_refused_alert_is_not_sent_again_and_is_logged_whole(caplog: pytest.LogCaptureFixture) -> None:
    alert = AlertEvent(
        kind=AlertKind.LABEL_SHARE, report_id="r9", model_version="v2", current_rows=300, reference_rows=900,
        label="spam", current_share=0.7, reference_share=0.1, z_score=30.0, examples=["buy now"],
    )  # fmt: skip
    with webhook_receiver(otherwise=400) as receiver, caplog.at_level(logging.ERROR, logger="flywheel.webhook"):
        webhook = AlertWebhook(receiver.url, timeout=5, attempts=5, backoff=0.05)
        try:
            assert webhook.deliver(alert) is False
        finally:
            webhook.close()

    assert len(receiver.received) == 1
    assert "refused alert" in caplog.text
    assert alert.event_id in caplog.text
    assert '"label":"spam"' in caplog.text


def test_no_url_means_no_webhook_and_a_bad_one_is_named() -> None:
    assert AlertWebhook.from_settings(Settings()) is None
    with pytest.raises(WebhookConfigError, match="FLYWHEEL_ALERT_WEBHOOK_URL must be an http"):
        AlertWebhook.from_settings(Settings(alert_webhook_url="hooks.example.com/alerts"))
