"""The current window read from the feedback store, and drift reports and targets indexed, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.database import Database
from flywheel.events import PredictionEvent, new_id, utcnow
from flywheel.models.feedback import FeedbackCreate
from flywheel.settings import Settings
from monitoring.drift import Signal
from monitoring.reports import DriftSummary, ReportArchive
from monitoring.store import DriftStore
from monitoring.window import WindowReader


@pytest.fixture()
def store(database_url: str, tmp_path: Path) -> Iterator[FeedbackStore]:
    """A migrated feedback store on the test database."""
    settings = Settings.model_validate({"home": tmp_path / "home", "database_url": database_url})
    database = Database(database_url).upgrade()
    yield FeedbackStore(database, settings)
    database.dispose()


def log_predictions(store: FeedbackStore, hours_ago: list[float]) -> list[str]:
    """Ingest one prediction per age, as the ingestion consumer would; returns their ids."""
    now = utcnow()
    events = [
        PredictionEvent(
            prediction_id=new_id(),
            model_version="v1",
            text=f"text number {i}",
            label="positive",
            confidence=0.8,
            scores={"negative": 0.2, "positive": 0.8},
            latency_ms=1.0,
            emitted_at=now - timedelta(hours=age),
        )
        for i, age in enumerate(hours_ago)
    ]
    store.ingest([prediction_row(e, now) for e in events])
    return [e.prediction_id for e in events]


def test_window_is_recent_predictions_with_accepted_feedback(store: FeedbackStore) -> None:
    ids = log_predictions(store, [50, 30, 5, 4, 3, 2, 1])
    # The model (0.8 positive) does not contradict this label, so vetting accepts it from an untrusted principal.
    store.submit(FeedbackCreate(prediction_id=ids[2], label="positive", source="annotation"))
    rejected = store.submit(FeedbackCreate(prediction_id=ids[3], label="negative", source="annotation"))
    store.resolve(rejected.feedback_id, accept=False, reason="wrong")
    reader = WindowReader(store.database)

    day = reader.load(hours=24, max_rows=100)

    assert day.frame["prediction_id"].tolist() == ids[2:]
    assert day.frame["feedback_label"].tolist() == ["positive", None, None, None, None]
    assert day.frame["predicted"].eq("positive").all()
    assert day.frame["confidence"].eq(0.8).all()
    assert day.start is not None
    assert day.end is not None
    assert day.end - day.start == timedelta(hours=24)
    assert "24 h" in day.rule
    capped = reader.load(hours=100, max_rows=3)
    assert capped.frame["prediction_id"].tolist() == ids[-3:]
    assert reader.load(hours=0.5, max_rows=100).frame.empty


def summary_of(verdict: str, score: float | None) -> DriftSummary:
    return DriftSummary(
        verdict=verdict,  # type: ignore[arg-type]
        model_version="v1",
        window_rule="test",
        current_rows=300,
        reference_rows=400,
        min_rows=200,
        min_signals=1,
        drift_score=score,
        fired=["text_content"] if verdict == "drifted" else [],
        signals=[
            Signal(
                name="text_content", kind="text", column="text", method="abs", threshold=0.6, score=0.9, drifted=True
            )
        ],
    )


def test_reports_and_targets_are_indexed(store: FeedbackStore) -> None:
    ids = log_predictions(store, [1, 1, 1, 1])
    drift = DriftStore(store.database)
    first = summary_of("no_drift", 0.0)
    second = summary_of("drifted", 0.5)
    second.created_at = first.created_at + timedelta(minutes=5)
    drift.add(first)
    drift.add(second, pd.DataFrame({"prediction_id": ids[:3], "drift_score": [0.9, 0.8, 0.7]}))
    store.submit(FeedbackCreate(prediction_id=ids[0], label="negative", source="annotation"))

    assert [r.report_id for r in drift.recent()] == [second.report_id, first.report_id]
    assert drift.count() == 2
    latest = drift.latest()
    assert latest is not None
    assert latest.report_id == second.report_id
    assert latest.verdict == "drifted"
    assert latest.signals["text_content"]["score"] == 0.9
    assert latest.html_url == f"/drift/reports/{second.report_id}"
    targets = drift.targets()
    # The labeled prediction has left the queue; the rest come most-unlike first.
    assert [t.prediction_id for t in targets] == ids[1:3]
    assert targets[0].text == "text number 1"
    assert targets[0].report_id == second.report_id

    third = summary_of("drifted", 0.5)
    third.created_at = second.created_at + timedelta(minutes=5)
    drift.add(third, pd.DataFrame({"prediction_id": [ids[2]], "drift_score": [0.95]}))
    assert [(t.prediction_id, t.report_id) for t in drift.targets()] == [
        (ids[2], third.report_id),
        (ids[1], second.report_id),
    ]


def test_old_reports_and_their_targets_are_pruned(store: FeedbackStore, tmp_path: Path) -> None:
    ids = log_predictions(store, [1, 1])
    drift = DriftStore(store.database)
    archive = ReportArchive(tmp_path / "home")
    summaries = [summary_of("drifted", 0.5) for _ in range(3)]
    for minutes, summary in enumerate(summaries):
        summary.created_at += timedelta(minutes=minutes)
        targeted = ids[minutes : minutes + 1]
        drift.add(summary, pd.DataFrame({"prediction_id": targeted, "drift_score": [0.9] * len(targeted)}))
        archive.save(summary, "<html></html>")

    assert drift.prune(keep=2) == 1
    assert archive.prune(keep=2) == [summaries[0].report_id]

    kept = [s.report_id for s in summaries[1:]]
    assert sorted(r.report_id for r in drift.recent()) == sorted(kept)
    assert archive.ids() == kept
    assert [t.prediction_id for t in drift.targets()] == [ids[1]]
