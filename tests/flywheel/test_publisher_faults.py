"""The publisher under real faults: a full disk while Kafka is down, group-committed spills, a SIGKILL mid-traffic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from flywheel.broker import EmbeddedBroker
from flywheel.events import PredictionEvent, Topic, new_id
from flywheel.publisher import EventPublisher, PublisherState
from flywheel.settings import Settings
from flywheel.spill import SpillFile
from tests.conftest import free_port, local_metric, read_topic, wait_until
from tests.faults import fill, small_filesystem

#: The documented SIGKILL window with Kafka down (README, "What a crash can lose"): an event accepted longer ago
#: than this is in the spill file.
SIGKILL_WINDOW_MS = 250


def _settings(home: Path, bootstrap: str, **overrides: Any) -> Settings:
    return Settings(home=home, kafka_bootstrap=bootstrap, kafka_timeout=2.0, kafka_retry_interval=0.2, **overrides)


def _prediction(text: str) -> PredictionEvent:
    return PredictionEvent(
        prediction_id=new_id(), model_version="v1", text=text, label="positive", confidence=0.9,
        scores={"negative": 0.1, "positive": 0.9}, latency_ms=3.0,
    )


def _delivered(bootstrap: str, wanted: list[str], timeout: float = 60.0) -> list[str]:
    """The ids of ``wanted`` on the predictions topic, in topic order, once all arrived (or ``timeout``)."""
    want = set(wanted)

    def ours(events: list[Any]) -> list[str]:
        return [e.prediction_id for e in events if getattr(e, "prediction_id", None) in want]

    return ours(read_topic(bootstrap, Topic.PREDICTIONS, lambda evs: set(ours(evs)) >= want, timeout=timeout))


def test_a_full_disk_holds_events_in_memory_and_delivers_them_once_space_returns(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    home = tmp_path / "home"
    with small_filesystem(home / "spill") as spill_dir:
        ballast = fill(spill_dir)
        events = [_prediction(f"while the disk is full {i}") for i in range(200)]
        with EventPublisher(_settings(home, bootstrap), name="full-disk") as publisher:
            for event in events:
                publisher.publish(event)
            wait_until(lambda: "No space left on device" in publisher.health().detail, what="the full disk shown")
            health = publisher.health()
            assert not health.up and "200 events held in memory" in health.detail, health
            assert local_metric("flywheel_thread_up", thread="publisher-full-disk") == 0
            assert local_metric("flywheel_thread_faults_total", thread="publisher-full-disk") >= 1
            stats = publisher.stats()
            assert (stats.spilled, stats.dropped, stats.queued) == (0, 0, 200), "accepted events are kept, not dropped"

            ballast.unlink()  # space returns
            wait_until(lambda: publisher.stats().spilled == 200, what="the held events on disk")
            assert publisher.health().up and publisher.state is PublisherState.SPILLING
            assert local_metric("flywheel_thread_up", thread="publisher-full-disk") == 1

            with EmbeddedBroker(port=port):
                wanted = [e.prediction_id for e in events]
                assert _delivered(bootstrap, wanted) == wanted, "every accepted event, once, in order"
                wait_until(lambda: publisher.stats().spill_bytes == 0, what="the spill file replayed")
                assert publisher.stats().dropped == 0


def test_kafka_back_before_the_disk_gets_the_held_events_and_memory_stays_bounded(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    home = tmp_path / "home"
    with small_filesystem(home / "spill") as spill_dir:
        fill(spill_dir)
        settings = _settings(home, bootstrap, publish_queue_size=50)
        with EventPublisher(settings, name="full-disk-bounded") as publisher:
            events = [_prediction(f"bounded {i}") for i in range(80)]
            for event in events:
                publisher.publish(event)
            # Beyond the memory bound an event must go to disk at once, which refuses it: dropped and counted.
            assert publisher.stats().dropped == 30
            assert publisher.stats().queued == 50
            wait_until(lambda: not publisher.health().up, what="the full disk shown")

            with EmbeddedBroker(port=port):
                wanted = [e.prediction_id for e in events[:50]]
                assert _delivered(bootstrap, wanted) == wanted, "the held events go straight to Kafka"
                wait_until(lambda: publisher.health().up, what="the fault cleared")
                assert publisher.state is PublisherState.CONNECTED
                assert publisher.health().detail == "events reach Kafka"


def test_the_delivery_thread_survives_an_unexpected_error_and_recovers_when_its_cause_is_gone(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    home = tmp_path / "home"
    # Something that is not a spill file under a spill file's name: adopting it fails on every attempt.
    stray = home / "spill" / "stray.spill"
    stray.mkdir(parents=True)
    events = [_prediction(f"through a crash {i}") for i in range(20)]
    with EventPublisher(_settings(home, bootstrap), name="crashing") as publisher:
        for event in events:
            publisher.publish(event)
        wait_until(lambda: local_metric("flywheel_thread_faults_total", thread="publisher-crashing") >= 3,
                   what="restarts with backoff")
        health = publisher.health()
        assert not health.up and "IsADirectoryError" in health.detail, health
        assert local_metric("flywheel_thread_up", thread="publisher-crashing") == 0
        assert publisher.stats().queued == 20, "the events it held survive its restarts"

        stray.rmdir()  # the cause goes away
        wait_until(lambda: publisher.stats().spilled == 20, what="the thread working again")
        assert publisher.health().up
        with EmbeddedBroker(port=port):
            wanted = [e.prediction_id for e in events]
            assert _delivered(bootstrap, wanted) == wanted


def test_spill_appends_are_fsynced_within_the_interval(tmp_path: Path) -> None:
    spill = SpillFile.create(tmp_path, "sync", fsync_interval=0.05)
    assert spill.commit is not None
    try:
        for _ in range(1000):
            spill.append(b"x\t\t{}\n")
        before = spill.commit.syncs
        assert before <= 5, "a burst of appends shares its fsyncs"
        wait_until(lambda: spill.commit is not None and spill.commit.syncs > before, timeout=1.0, what="an fsync")
        # A single later append is synced within the interval too.
        synced = spill.commit.syncs
        started = time.monotonic()
        spill.append(b"x\t\t{}\n")
        wait_until(lambda: spill.commit is not None and spill.commit.syncs > synced, timeout=1.0, what="an fsync")
        assert time.monotonic() - started < 0.5
    finally:
        spill.close()


PUBLISHER_CHILD = textwrap.dedent(
    """
    import sys, time
    from flywheel.events import PredictionEvent, new_id
    from flywheel.publisher import EventPublisher
    from flywheel.settings import Settings

    home, bootstrap = sys.argv[1], sys.argv[2]
    publisher = EventPublisher(Settings(home=home, kafka_bootstrap=bootstrap, kafka_retry_interval=0.2),
                               name="killed").start()
    while True:
        event = PredictionEvent(prediction_id=new_id(), model_version="v1", text="steady traffic", label="positive",
                                confidence=0.9, scores={"negative": 0.1, "positive": 0.9}, latency_ms=1.0)
        publisher.publish(event)
        # Accepted: publish() returned. The parent reads the id and when it was accepted.
        sys.stdout.write(f"{event.prediction_id} {time.time()}\\n")
        sys.stdout.flush()
        time.sleep(0.0005)
    """
)


def test_sigkill_mid_traffic_loses_at_most_the_documented_window(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    home = tmp_path / "home"
    child = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER_CHILD, str(home), bootstrap],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
    )
    accepted: list[tuple[str, float]] = []
    reader = threading.Thread(target=_read_accepted, args=(child, accepted), daemon=True)
    reader.start()
    wait_until(lambda: len(accepted) >= 3000, timeout=60, what="3,000 accepted events")
    killed_at = time.time()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    reader.join(10)
    assert len(accepted) >= 3000

    # The next process adopts the dead one's spill file and replays it once Kafka is back.
    with EmbeddedBroker(port=port), EventPublisher(_settings(home, bootstrap), name="after-kill"):
        ids = [prediction_id for prediction_id, _ in accepted]
        delivered = set(_delivered(bootstrap, ids, timeout=30))
    lost = [(prediction_id, at) for prediction_id, at in accepted if prediction_id not in delivered]
    assert len(lost) <= Settings().publish_queue_size
    oldest_lost_ms = max(((killed_at - at) * 1000 for _, at in lost), default=0.0)
    assert oldest_lost_ms <= SIGKILL_WINDOW_MS, (
        f"lost {len(lost)} of {len(accepted)} events, accepted up to {oldest_lost_ms:.0f} ms before the SIGKILL"
    )
    print(f"SIGKILL lost {len(lost)} of {len(accepted)} accepted events, the oldest {oldest_lost_ms:.1f} ms old")


def _read_accepted(child: subprocess.Popen[str], accepted: list[tuple[str, float]]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        parts = line.split()
        if len(parts) == 2:  # a line cut by the SIGKILL was never complete, so never accepted
            accepted.append((parts[0], float(parts[1])))
