"""Prometheus series of the service, added to BentoML's /metrics (multiprocess-safe across workers)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ServiceMetrics:
    """The service's own series; Kafka event counters live with the publisher."""

    predictions: Any
    confidence: Any
    batch_texts: Any
    batch_requests: Any
    inference_seconds: Any
    model_swaps: Any
    served_model: Any

    def observe_predictions(self, version: str, labels: list[str], best: np.ndarray, confidence: np.ndarray) -> None:
        """Count one request's predictions by label and record their confidences."""
        for index, count in zip(*np.unique(best, return_counts=True), strict=True):
            self.predictions.labels(label=labels[index], model_version=version).inc(int(count))
        for value in confidence.tolist():
            self.confidence.observe(value)

    def observe_batch(self, texts: int, requests: int, seconds: float) -> None:
        """Record one inference batch."""
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.inference_seconds.observe(seconds)

    def observe_swap(self, version: str, previous: str | None) -> None:
        """Record that this worker now serves ``version``."""
        self.model_swaps.inc()
        if previous is not None:
            self.served_model.labels(version=previous).set(0)
        self.served_model.labels(version=version).set(1)


@functools.cache
def service_metrics() -> ServiceMetrics:
    """The process's series, created on first use (after BentoML set PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Counter, Gauge, Histogram

    return ServiceMetrics(
        predictions=Counter(
            "flywheel_predictions", "Predictions by label and model version.", ["label", "model_version"]
        ),
        confidence=Histogram(
            "flywheel_prediction_confidence", "Probability of the predicted label.", buckets=CONFIDENCE_BUCKETS
        ),
        batch_texts=Histogram("flywheel_batch_size", "Texts per inference batch.", buckets=SIZE_BUCKETS),
        batch_requests=Histogram(
            "flywheel_batch_requests", "Requests merged into one inference batch.", buckets=SIZE_BUCKETS
        ),
        inference_seconds=Histogram("flywheel_inference_seconds", "Tokenization plus forward pass per batch."),
        model_swaps=Counter("flywheel_model_swaps", "Models loaded and swapped in by hot reload (first load too)."),
        served_model=Gauge(
            "flywheel_served_model",
            "1 for the model version a worker serves.",
            ["version"],
            multiprocess_mode="livemax",
        ),
    )
