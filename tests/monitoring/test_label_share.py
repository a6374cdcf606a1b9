"""Label-share monitoring: a label whose share of the window departs from the reference raises an alert on
``flywheel.alerts``, an unchanged window raises none; hourly shares counted by SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import delete

from feedback.prediction_rows import prediction_row
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import AlertEvent, AlertKind, Event, PredictionEvent, Topic, new_id, utcnow
from flywheel.models.feedback import Prediction
from flywheel.publisher import EventPublisher
from flywheel.settings import Settings
from monitoring.label_share import EXAMPLE_CHARS, HourlyCount, compare_label_shares, hourly_label_counts
from monitoring.monitor import DriftMonitor
from monitoring.reports import ReportArchive
from monitoring.window import CurrentWindow
from tests.conftest import read_topic
from tests.monitoring.conftest import same_texts
from tests.support import synthetic_sentiment

WindowFactory = Callable[..., CurrentWindow]
LABELS = ["billing", "delivery", "quality"]


def window_of(labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"predicted": labels, "text": [f"text {i} about {label}" for i, label in enumerate(labels)]})


def compare(reference: list[str], current: list[str], labels: list[str] = LABELS) -> dict[str, tuple[bool, float]]:
    check = compare_label_shares(reference, window_of(current), labels, max_diff=0.15, min_z=4.0, min_rows=10)
    return {share.label: (share.shifted, share.current_share) for share in check.shares}


def test_only_a_label_that_moved_far_and_surely_is_flagged() -> None:
    reference = LABELS * 300  # a third each

    unchanged = compare(reference, ["billing"] * 105 + ["delivery"] * 95 + ["quality"] * 100)
    shifted = compare(reference, ["billing"] * 180 + ["delivery"] * 60 + ["quality"] * 60)
    # The same move on 20 predictions is within what chance does to a window that small.
    small = compare(reference, ["billing"] * 12 + ["delivery"] * 4 + ["quality"] * 4)

    assert not any(flag for flag, _ in unchanged.values())
    assert shifted == {"billing": (True, 0.6), "delivery": (False, 0.2), "quality": (False, 0.2)}
    assert not any(flag for flag, _ in small.values())


def test_a_label_the_reference_never_predicted_is_flagged_when_it_takes_a_share() -> None:
    check = compare_label_shares(
        LABELS * 300, window_of(["billing", "delivery", "quality", "refunds", "refunds"] * 60), LABELS,
        max_diff=0.15, min_z=4.0, min_rows=10,
    )  # fmt: skip

    refunds = next(share for share in check.shares if share.label == "refunds")
    assert refunds.shifted
    assert (refunds.reference_share, refunds.current_share) == (0.0, 0.4)
    assert 4 < refunds.z_score < float("inf")
    assert [share.label for share in check.shares] == [*LABELS, "refunds"]
    assert check.describe() == "label share shifted: refunds 0.00 → 0.40"
    # The newest texts predicted as the label, as the alert will carry them.
    assert refunds.examples == ["text 299 about refunds", "text 298 about refunds", "text 294 about refunds"]


def test_examples_are_cut_and_a_small_window_is_skipped() -> None:
    long_text = "x" * 5000
    current = pd.DataFrame({"predicted": ["billing"] * 300, "text": [long_text] * 300})
    check = compare_label_shares(LABELS * 300, current, LABELS, max_diff=0.15, min_z=4.0, min_rows=10)
    skipped = compare_label_shares(LABELS * 300, current.head(5), LABELS, max_diff=0.15, min_z=4.0, min_rows=10)

    assert all(len(text) == EXAMPLE_CHARS for text in check.shifted[0].examples)
    assert skipped.shares == []
    assert skipped.skipped is not None
    assert "5 predictions" in skipped.skipped


def store_predictions(database: Database, rows: list[tuple[str, str, datetime]], version: str = "v1") -> None:
    """Store one prediction per (text, label, time), as `flywheel ingest` would."""
    now = utcnow()
    with database.session() as session:
        for text, label, at in rows:
            event = PredictionEvent(
                prediction_id=new_id(), model_version=version, text=text, label=label, confidence=0.9,
                scores={label: 0.9}, latency_ms=1.0, emitted_at=at,
            )  # fmt: skip
            session.add(Prediction.model_validate(prediction_row(event, now)))


@pytest.fixture()
def database(database_url: str) -> Iterator[Database]:
    migrated = Database(database_url).upgrade()
    yield migrated
    migrated.dispose()


def test_hourly_counts_by_label_on_both_databases(database: Database) -> None:
    base = datetime(2024, 3, 10, 8, 0, tzinfo=UTC)
    at = [base + timedelta(minutes=m) for m in (1, 59, 61, 125, 30)]
    store_predictions(
        database,
        [("a", "billing", at[0]), ("b", "billing", at[1]), ("c", "quality", at[2]), ("d", "<b>x</b>", at[3]),
         ("e", "delivery", at[4]), ("old", "billing", base - timedelta(hours=3))],
    )  # fmt: skip

    counts = hourly_label_counts(database, base, base + timedelta(hours=3))

    assert counts == [
        HourlyCount(base, "billing", 2),
        HourlyCount(base, "delivery", 1),
        HourlyCount(base + timedelta(hours=1), "quality", 1),
        HourlyCount(base + timedelta(hours=2), "<b>x</b>", 1),
    ]
    assert all(count.hour.tzinfo is not None for count in counts)


def shifted_texts(n: int, negative_share: float, seed: int = 12) -> list[str]:
    """``n`` texts of the champion's own task, ``negative_share`` of them negative."""
    frame = synthetic_sentiment(2 * n, seed=seed)
    negatives = frame[frame["label"] == "negative"]["text"].head(round(n * negative_share))
    positives = frame[frame["label"] == "positive"]["text"].head(n - len(negatives))
    return pd.concat([negatives, positives]).sample(frac=1.0, random_state=seed).tolist()


def label_alerts(events: list[Event], report_id: str) -> list[AlertEvent]:
    return [
        e for e in events if isinstance(e, AlertEvent) and e.report_id == report_id and e.kind is AlertKind.LABEL_SHARE
    ]


def test_a_shifted_window_raises_a_label_share_alert_and_an_unchanged_one_does_not(
    database: Database,
    database_url: str,
    monitor_settings: Settings,
    drift_monitor: DriftMonitor,
    broker: EmbeddedBroker,
) -> None:
    # The trained home's registry and reference caches; this test's database and broker.
    settings = monitor_settings.model_copy(update={"database_url": database_url, "kafka_bootstrap": broker.bootstrap})
    champion = drift_monitor.registry.champion_version()
    classifier = drift_monitor.classifier(champion)
    publisher = EventPublisher(settings, name="label-share-test").start()
    monitor = DriftMonitor(settings, database=database, publisher=publisher)

    def run_on(texts: list[str]) -> str:
        with database.session() as session:
            session.execute(delete(Prediction))
        probs = classifier.predict_proba(texts).probs
        now = utcnow()
        store_predictions(
            database,
            [(text, classifier.labels[int(p.argmax())], now - timedelta(minutes=len(texts) - i))
             for i, (text, p) in enumerate(zip(texts, probs, strict=True))],
            version=champion.version,
        )  # fmt: skip
        return monitor.run().report_id

    try:
        unchanged = run_on(same_texts(300))
        shifted = run_on(shifted_texts(300, negative_share=0.9))
    finally:
        publisher.close()

    quiet = ReportArchive(settings.home).summary(unchanged)
    assert quiet.label_share is not None
    assert quiet.label_share.shifted == [], quiet.label_share
    assert {share.label for share in quiet.label_share.shares} == {"negative", "positive"}
    assert "label share shifted" not in quiet.message

    summary = ReportArchive(settings.home).summary(shifted)
    assert summary.label_share is not None
    moved = {share.label: share for share in summary.label_share.shifted}
    assert set(moved) == {"negative", "positive"}
    assert moved["negative"].current_share > 0.8
    assert 0.35 < moved["negative"].reference_share < 0.65
    assert "label share shifted: " in summary.message

    # The unchanged window's report was published first: any alert of it would be read before the shifted ones.
    events = read_topic(
        broker.bootstrap, Topic.ALERTS, lambda events: len(label_alerts(events, shifted)) >= 2, timeout=20
    )
    assert label_alerts(events, unchanged) == []
    alerts = {alert.label: alert for alert in label_alerts(events, shifted)}
    assert set(alerts) == {"negative", "positive"}
    negative = alerts["negative"]
    assert negative.event_id == moved["negative"].alert_event_id
    assert (negative.current_share, negative.reference_share) == (
        moved["negative"].current_share, moved["negative"].reference_share,
    )  # fmt: skip
    assert negative.current_rows == 300
    assert negative.model_version == champion.version
    assert negative.z_score is not None and negative.z_score > 4
    assert 1 <= len(negative.examples) <= 3
    assert all(text in set(shifted_texts(300, negative_share=0.9)) for text in negative.examples)
    # The report people open shows every label's two shares.
    page = (settings.home / "monitoring" / "reports" / shifted / "report.html").read_text()
    assert 'id="label-shares"' in page
