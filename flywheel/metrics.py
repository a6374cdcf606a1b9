"""Prometheus metrics of the event publisher (multiprocess-safe inside the BentoML service)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flywheel.events import Topic


@dataclass(frozen=True)
class PublisherMetrics:
    """Events by topic and outcome, and the bytes waiting in spill files."""

    events: Any
    spill_bytes: Any

    def count(self, outcome: str, by_topic: Mapping[str, int]) -> None:
        """Add events of one outcome (sent, spilled, dropped), counted by topic."""
        for topic, count in by_topic.items():
            self.events.labels(topic=topic, outcome=outcome).inc(count)


@functools.cache
def publisher_metrics() -> PublisherMetrics:
    """The process's publisher metrics, created on first use (after BentoML set PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Counter, Gauge

    events = Counter(
        "flywheel_kafka_events",
        "Events by topic and outcome: sent (acknowledged by Kafka), spilled (written to disk), dropped.",
        ["topic", "outcome"],
    )
    for topic in Topic:
        for outcome in ("sent", "spilled", "dropped"):
            # Export zeros from the start, so rate() and alerts see a series before the first failure.
            events.labels(topic=topic.value, outcome=outcome)
    return PublisherMetrics(
        events=events,
        spill_bytes=Gauge(
            "flywheel_kafka_spill_bytes", "Bytes waiting in spill files for replay.", multiprocess_mode="livesum"
        ),
    )
