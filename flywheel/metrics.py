"""Prometheus metrics of the event publisher and of supervised background threads (multiprocess-safe inside the
BentoML service)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel.events import Topic

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: Fsync lag buckets, in seconds: around the default 20 ms interval, up to a disk that stalls for seconds.
FSYNC_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(frozen=True)
class PublisherMetrics:
    """Events by topic and outcome, the bytes waiting in spill files, and how long spill appends wait for fsync."""

    events: Any
    spill_bytes: Any
    fsync_lag: Any

    def count(self, outcome: str, by_topic: Mapping[str, int]) -> None:
        """Add events of one outcome (sent, spilled, dropped), counted by topic."""
        for topic, count in by_topic.items():
            self.events.labels(topic=topic, outcome=outcome).inc(count)


@functools.cache
def publisher_metrics() -> PublisherMetrics:
    """The process's publisher metrics, created on first use (after BentoML set PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Counter, Gauge, Histogram

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
        fsync_lag=Histogram(
            "flywheel_spill_fsync_lag_seconds",
            "Seconds from the first spill append not yet on stable storage to the end of the fsync covering it: "
            "the power-loss window (FLYWHEEL_SPILL_FSYNC_MS plus the fsync itself).",
            buckets=FSYNC_LAG_BUCKETS,
        ),
    )


@dataclass(frozen=True)
class ThreadMetrics:
    """Whether each supervised background thread works, and how often it failed."""

    up: Any
    faults: Any


def thread_metrics(registry: CollectorRegistry | None = None) -> ThreadMetrics:
    """The thread series in ``registry`` (default: the process's), created once per registry."""
    from prometheus_client import REGISTRY

    return _thread_metrics(registry if registry is not None else REGISTRY)


@functools.cache
def _thread_metrics(target: CollectorRegistry) -> ThreadMetrics:
    from prometheus_client import Counter, Gauge

    return ThreadMetrics(
        up=Gauge(
            "flywheel_thread_up",
            "1 while a background thread does its work, 0 while it is failing and retrying with backoff.",
            ["thread"],
            multiprocess_mode="livemin",
            registry=target,
        ),
        faults=Counter(
            "flywheel_thread_faults",
            "Faults of background threads: unexpected exceptions (the thread restarts after a backoff) and "
            "failures it retries itself (a full disk, an unreachable database).",
            ["thread"],
            registry=target,
        ),
    )


#: Routes whose admission is measured; their series exist (at zero) from the start.
ADMITTED_ROUTES = ("predict", "feedback")


@dataclass(frozen=True)
class AdmissionMetrics:
    """Admission control of the request routes: refusals, work dropped before compute, what is in flight."""

    refused: Any
    dropped: Any
    in_flight: Any
    limit: Any


@functools.cache
def admission_metrics() -> AdmissionMetrics:
    """The process's admission metrics, created on first use (after BentoML set PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Counter, Gauge

    refused = Counter(
        "flywheel_admission_refused",
        "Requests answered 503 by admission control, by route and the bound they would pass (texts, body, requests).",
        ["route", "reason"],
    )
    dropped = Counter(
        "flywheel_dropped_jobs",
        "Admitted requests dropped before compute: cancelled (the client disconnected or the request timed out), "
        "or expired (the deadline passed while waiting).",
        ["route", "reason"],
    )
    for route in ADMITTED_ROUTES:
        for reason in ("cancelled", "expired"):
            dropped.labels(route=route, reason=reason)
    return AdmissionMetrics(
        refused=refused,
        dropped=dropped,
        in_flight=Gauge(
            "flywheel_admission_in_flight",
            "Units in flight per route (texts for predict, requests for feedback), summed over workers.",
            ["route"],
            multiprocess_mode="livesum",
        ),
        limit=Gauge(
            "flywheel_admission_limit",
            "Admission bound per route in the same units, summed over workers.",
            ["route"],
            multiprocess_mode="livesum",
        ),
    )


@dataclass(frozen=True)
class ChampionMetrics:
    """Models a service worker refused to serve because they fail to load."""

    load_failures: Any
    refused: Any

    def failed(self, version: str) -> None:
        """Count a failed load of ``version`` (the pointer's champion, or an earlier one tried in its place)."""
        self.load_failures.labels(version=version).inc()

    def refuse(self, version: str) -> None:
        """Mark the pointer's champion ``version`` as refused by this worker."""
        self.refused.labels(version=version).set(1)

    def clear(self, version: str) -> None:
        """``version`` is no longer refused (it loaded, or the pointer moved on)."""
        self.refused.labels(version=version).set(0)


@functools.cache
def champion_metrics() -> ChampionMetrics:
    """The process's champion-load metrics, created on first use (after BentoML set PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Counter, Gauge

    return ChampionMetrics(
        load_failures=Counter(
            "flywheel_champion_load_failures",
            "Failed loads of a champion (or of an earlier champion tried in its place), by version.",
            ["version"],
        ),
        refused=Gauge(
            "flywheel_champion_refused",
            "1 while a worker refuses the pointer's champion because it fails to load.",
            ["version"],
            multiprocess_mode="livemax",
        ),
    )
