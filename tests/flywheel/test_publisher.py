"""EventPublisher against a real tansu broker: delivery, spilling while it is down, ordered replay, disk cap."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.broker import EmbeddedBroker
from flywheel.events import FeedbackEvent, PredictionEvent, Topic, new_id
from flywheel.publisher import EventPublisher, PublisherState
from flywheel.settings import Settings
from tests.conftest import free_port, read_topic


def _settings(home: Path, bootstrap: str, **overrides: Any) -> Settings:
    return Settings(home=home, kafka_bootstrap=bootstrap, kafka_timeout=2.0, kafka_retry_interval=0.2, **overrides)


def _prediction(text: str = "a great film") -> PredictionEvent:
    return PredictionEvent(
        prediction_id=new_id(),
        model_version="v1",
        text=text,
        label="positive",
        confidence=0.9,
        scores={"negative": 0.1, "positive": 0.9},
        latency_ms=3.0,
    )


def _wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _ids_in(topic: Topic, bootstrap: str, wanted: list[str]) -> list[str]:
    def key(event: object) -> str:
        return str(getattr(event, "prediction_id", None) or getattr(event, "feedback_id", ""))

    events = read_topic(bootstrap, topic, lambda evs: set(wanted) <= {key(e) for e in evs})
    return [key(e) for e in events if key(e) in set(wanted)]


def test_events_reach_their_topics(tmp_path: Path, broker: EmbeddedBroker) -> None:
    predictions = [_prediction(f"text {i}") for i in range(50)]
    feedback = FeedbackEvent(feedback_id=new_id(), label="negative", source="api", status="accepted", text="meh")
    with EventPublisher(_settings(tmp_path, broker.bootstrap), name="test") as publisher:
        for event in predictions:
            publisher.publish(event)
        publisher.publish(feedback)
        _wait(lambda: publisher.stats().sent == 51)
        assert publisher.state is PublisherState.CONNECTED
        assert publisher.stats().spilled == 0

    wanted = [p.prediction_id for p in predictions]
    assert _ids_in(Topic.PREDICTIONS, broker.bootstrap, wanted) == wanted
    assert _ids_in(Topic.FEEDBACK, broker.bootstrap, [feedback.feedback_id]) == [feedback.feedback_id]
    assert not list((tmp_path / "spill").glob("*.spill")), "a clean close leaves no spill file"


def test_spills_while_broker_is_down_and_replays_in_order_when_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    events = [_prediction(f"offline {i}") for i in range(30)]
    with EventPublisher(_settings(tmp_path, bootstrap), name="test") as publisher:
        started = time.perf_counter()
        for event in events[:20]:
            publisher.publish(event)
        assert time.perf_counter() - started < 0.5, "publish() must not wait for the broker"
        _wait(lambda: publisher.stats().spilled == 20)
        assert publisher.state is PublisherState.SPILLING and publisher.healthy()
        assert publisher.stats().spill_bytes > 0
        assert len(list((tmp_path / "spill").glob("*.spill"))) == 1

        with EmbeddedBroker(port=port):
            for event in events[20:]:
                publisher.publish(event)
            # The state turns connected on the replay step after the last chunk's acknowledgements are counted.
            _wait(lambda: publisher.stats().sent == 30 and publisher.state is PublisherState.CONNECTED)
            assert publisher.state is PublisherState.CONNECTED
            assert publisher.stats().spill_bytes == 0
            wanted = [e.prediction_id for e in events]
            assert _ids_in(Topic.PREDICTIONS, bootstrap, wanted) == wanted, "all delivered once, in publish order"
            assert publisher.stats().dropped == 0


def test_spill_file_of_a_dead_process_is_replayed_by_the_next_publisher(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    events = [_prediction(f"left behind {i}") for i in range(10)]
    first = EventPublisher(_settings(tmp_path, bootstrap), name="crashed").start()
    for event in events:
        first.publish(event)
    _wait(lambda: first.stats().spilled == 10)
    first.close(timeout=0.5)
    assert len(list((tmp_path / "spill").glob("*.spill"))) == 1, "undelivered events stay on disk"

    with EmbeddedBroker(port=port), EventPublisher(_settings(tmp_path, bootstrap), name="next") as second:
        wanted = [e.prediction_id for e in events]
        assert _ids_in(Topic.PREDICTIONS, bootstrap, wanted) == wanted
        _wait(lambda: not list((tmp_path / "spill").glob("*.spill")))
        assert second.stats().spill_bytes == 0


def test_events_beyond_the_disk_cap_are_dropped_and_counted(tmp_path: Path) -> None:
    line_bytes = len(_prediction("x" * 100).model_dump_json()) + 60
    settings = _settings(tmp_path, f"127.0.0.1:{free_port()}", spill_max_bytes=5 * line_bytes)
    with EventPublisher(settings, name="test") as publisher:
        for _ in range(20):
            publisher.publish(_prediction("x" * 100))
        _wait(lambda: publisher.stats().spilled + publisher.stats().dropped == 20)
        stats = publisher.stats()
        assert 0 < stats.spilled <= 5
        assert stats.dropped == 20 - stats.spilled
        assert stats.spill_bytes <= settings.spill_max_bytes


def test_events_unacknowledged_at_close_are_kept_on_disk(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker = EmbeddedBroker(port=port).start()
    publisher = EventPublisher(_settings(tmp_path, bootstrap), name="closing").start()
    try:
        _wait(lambda: publisher.state is PublisherState.CONNECTED)
        broker.stop()
        events = [_prediction(f"in flight {i}") for i in range(10)]
        for event in events:
            publisher.publish(event)
        publisher.close(timeout=0.5)  # long before Kafka's own timeout gives up on them
        assert publisher.stats().spilled == 10
    finally:
        broker.stop()

    with EmbeddedBroker(port=port), EventPublisher(_settings(tmp_path, bootstrap), name="next"):
        wanted = [e.prediction_id for e in events]
        assert sorted(_ids_in(Topic.PREDICTIONS, bootstrap, wanted)) == sorted(wanted)
