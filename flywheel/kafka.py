"""Kafka clients, built one way everywhere: the bootstrap servers and the consumer-group timing tansu needs.

Each factory takes what it needs as arguments; keyword overrides are kafka-python options and win over the shared
defaults. kafka-python is imported on first use, so importing this module (and the publisher) stays cheap.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flywheel.settings import CoreSettings, Settings
from flywheel.spill import Record

if TYPE_CHECKING:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer


def kafka_producer(settings: CoreSettings, **overrides: Any) -> KafkaProducer:
    """A producer for ``settings.kafka_bootstrap``; ``overrides`` are ``KafkaProducer`` options."""
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, **overrides)


def event_producer(settings: CoreSettings, client_id: str) -> KafkaProducer:
    """The event publisher's producer: each event acknowledged by every replica within ``settings.kafka_timeout``.

    Its ``send()`` must only be called from one thread, the publisher's.
    """
    timeout_ms = int(settings.kafka_timeout * 1000)
    return kafka_producer(
        settings,
        client_id=client_id,
        acks="all",
        # Idempotence needs a producer id that a restarted broker no longer knows, which kafka-python
        # treats as fatal; duplicates are avoided here instead (acks, one request in flight, replay ids).
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
        # Batching ~0.1 s of events per produce request keeps the client's CPU cost per event low.
        linger_ms=100,
        # send() runs on the publisher's thread only; a short block keeps an outage from stalling its queue.
        max_block_ms=1000,
        request_timeout_ms=max(1000, timeout_ms // 2),
        delivery_timeout_ms=timeout_ms,
        reconnect_backoff_max_ms=1000,
    )


def kafka_consumer(settings: Settings, *topics: str, group_id: str, **overrides: Any) -> KafkaConsumer:
    """A member of consumer group ``group_id``, subscribed to ``topics`` (if any); ``overrides`` are its options.

    The group timing derives from ``settings.ingest_max_poll_interval_ms``.
    """
    from kafka import KafkaConsumer

    interval = settings.ingest_max_poll_interval_ms
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": group_id,
        # tansu holds a group join for the whole rebalance timeout, which is this value: keep it short.
        "max_poll_interval_ms": interval,
        # Kafka refuses session timeouts below its group.min.session.timeout.ms, 6 s by default.
        "session_timeout_ms": max(6000, interval + 1000),
        "heartbeat_interval_ms": 1000,
    }
    return KafkaConsumer(*topics, **{**options, **overrides})


def kafka_admin(bootstrap: str, **overrides: Any) -> KafkaAdminClient:
    """An admin client for ``bootstrap`` (comma-separated servers); ``overrides`` are its options."""
    from kafka import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=bootstrap, **{"request_timeout_ms": 10_000, **overrides})


def reachable(bootstrap: str, timeout: float = 1.0) -> bool:
    """Whether any of the comma-separated bootstrap servers accepts a TCP connection."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host or "localhost", int(port)), timeout=timeout).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def send_and_wait(producer: KafkaProducer, records: Sequence[Record], timeout: float) -> list[bool]:
    """Send ``records`` in order and wait up to ``timeout`` seconds for them; one flag per record, True if acknowledged.

    Sending stops at the first record the producer refuses (no metadata or buffer space): it and those after it fail.
    """
    from kafka.errors import KafkaError

    futures = []
    for record in records:
        try:
            futures.append(producer.send(record.topic, value=record.payload, key=record.key))
        except KafkaError:
            break
    with contextlib.suppress(KafkaError):
        producer.flush(timeout=timeout)
    ok = [future.is_done and future.succeeded() for future in futures]
    return ok + [False] * (len(records) - len(ok))
