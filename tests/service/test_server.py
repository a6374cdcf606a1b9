"""End to end through a real `bentoml serve` process: BentoML's health and readiness routes, the metrics it sums
over workers, and a refusal made on the socket before the body is read."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.service.conftest import metric, samples

pytestmark = pytest.mark.slow


def test_health_and_readiness(service_url: str) -> None:
    assert httpx.get(f"{service_url}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{service_url}/readyz", timeout=10)
    assert ready.status_code == 200
    components = ready.json()["components"]
    assert set(components) == {"model", "batcher", "broker", "database", "hot_reload", "access"}
    assert all(state["up"] for state in components.values()), components
    assert metric(service_url, "flywheel_component_up", component="database") == 1


def test_metrics_expose_predictions_confidence_batches_and_kafka_events(service_url: str) -> None:
    version = httpx.get(f"{service_url}/model", timeout=30).json()["version"]
    answer = httpx.post(f"{service_url}/predict", json={"texts": ["great", "awful"]}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert metric(service_url, "flywheel_predictions_total", label="positive", model_version=version) >= 1
    assert metric(service_url, "flywheel_predictions_total", label="negative", model_version=version) >= 1
    assert metric(service_url, "flywheel_prediction_confidence_count") >= 2
    assert metric(service_url, "flywheel_batch_size_count") >= 1
    assert metric(service_url, "flywheel_served_model", version=version) == 1
    for outcome in ("sent", "spilled", "dropped"):
        assert samples(service_url, "flywheel_kafka_events_total", topic="flywheel.predictions", outcome=outcome)
    assert metric(service_url, "flywheel_kafka_events_total", topic="flywheel.predictions", outcome="sent") >= 1


def test_oversized_body_is_refused_before_it_is_read(service_url: str) -> None:
    host, port = service_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Only the headers are sent: the refusal must not wait for 100 MB that never come.
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )
        reply = b""
        # Headers and body may arrive in separate segments: read until the declared body is complete.
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _content_length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.decode().startswith("HTTP/1.1 413")
    assert "larger than any valid request" in reply.decode()


def _content_length(reply: bytes) -> int:
    head = reply.split(b"\r\n\r\n", 1)[0].decode().lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 0
