"""Drift verdicts of the champion's reference against windows of known content."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest

from flywheel.settings import Settings
from monitoring.monitor import DriftMonitor
from monitoring.window import CurrentWindow
from tests.monitoring.conftest import FINANCE_WORDS, GERMAN_WORDS, same_texts, word_sentences

WindowFactory = Callable[..., CurrentWindow]
TEXT_SIGNALS = {"text_content", "embeddings"}


def test_window_like_the_training_data_gives_no_drift(drift_monitor: DriftMonitor, make_window: WindowFactory) -> None:
    summary = drift_monitor.evaluate(make_window(same_texts(300))).summary

    assert summary.verdict == "no_drift", summary.message
    assert summary.fired == []
    assert summary.drift_score == 0.0
    scored = {s.name for s in summary.signals if s.score is not None}
    assert {"text_content", "embeddings", "descriptor.length", "descriptor.oov_share", "prediction.label"} <= scored
    feedback = next(s for s in summary.signals if s.name == "feedback.label")
    assert feedback.score is None
    assert feedback.skipped is not None
    assert "accepted feedback" in feedback.skipped
    assert summary.reference_rows > 200
    assert summary.timings["evidently_seconds"] > 0


class Shift(NamedTuple):
    """A way current traffic departs from the training data, and the signals that must (not) notice it."""

    texts: Callable[[], list[str]]
    expected: set[str]
    quiet: set[str]


SHIFTS = {
    "other domain": Shift(lambda: word_sentences(FINANCE_WORDS, 300, 1), {"text_content", "embeddings"}, set()),
    "other language": Shift(
        lambda: word_sentences(GERMAN_WORDS, 300, 2), {"descriptor.oov_share", "text_content"}, set()
    ),
    # The model's tokenizer is uncased, so shouting changes nothing it sees: only the descriptor notices.
    "uppercase": Shift(lambda: [t.upper() for t in same_texts(300)], {"descriptor.upper_share"}, TEXT_SIGNALS),
    "very long": Shift(lambda: [" ".join([t] * 30) for t in same_texts(300)], {"descriptor.length"}, {"text_content"}),
}


@pytest.mark.parametrize("case", list(SHIFTS))
def test_shifted_window_drifts_on_the_expected_signal(
    drift_monitor: DriftMonitor, make_window: WindowFactory, case: str
) -> None:
    shift = SHIFTS[case]
    outcome = drift_monitor.evaluate(make_window(shift.texts()))
    summary = outcome.summary

    assert summary.verdict == "drifted", case
    assert shift.expected <= set(summary.fired), (case, summary.fired)
    assert not shift.quiet & set(summary.fired), (case, summary.fired)
    assert summary.drift_score is not None
    assert 0 < summary.drift_score <= 1
    assert len(outcome.targets) == 20
    assert "flywheel-summary" in outcome.html


def test_tiny_window_is_insufficient_data(drift_monitor: DriftMonitor, make_window: WindowFactory) -> None:
    outcome = drift_monitor.evaluate(make_window(word_sentences(FINANCE_WORDS, 50, 3)))
    summary = outcome.summary

    assert summary.verdict == "insufficient_data"
    assert summary.drift_score is None
    assert summary.signals == []
    assert "50 predictions" in summary.message
    assert "200" in summary.message
    assert "insufficient data" in outcome.html


def test_targeted_rows_are_the_shifted_ones(drift_monitor: DriftMonitor, make_window: WindowFactory) -> None:
    shifted = word_sentences(FINANCE_WORDS, 100, 4)
    window = make_window(same_texts(200) + shifted)

    outcome = drift_monitor.evaluate(window)

    assert outcome.summary.verdict == "drifted"
    top = outcome.targets["text"].tolist()
    assert len(top) == 20
    assert set(top) <= set(shifted)
    assert outcome.targets["drift_score"].is_monotonic_decreasing


def test_feedback_label_drift_needs_enough_accepted_labels(
    drift_monitor: DriftMonitor, make_window: WindowFactory
) -> None:
    texts = same_texts(300)
    few = drift_monitor.evaluate(make_window(texts, feedback=["negative"] * 40 + [None] * 260)).summary
    many = drift_monitor.evaluate(make_window(texts, feedback=["negative"] * 120 + [None] * 180)).summary

    few_signal = next(s for s in few.signals if s.name == "feedback.label")
    assert few_signal.skipped is not None
    assert "40 accepted feedback labels" in few_signal.skipped
    assert "feedback.label" in many.fired
    assert many.feedback_rows == 120


def test_prediction_signals_use_only_the_serving_models_rows(
    drift_monitor: DriftMonitor, make_window: WindowFactory
) -> None:
    window = make_window(same_texts(300))
    window.frame.loc[100:, "model_version"] = "older-version"

    summary = drift_monitor.evaluate(window).summary

    assert summary.served_rows == 100
    for signal in summary.signals:
        if signal.kind == "prediction":
            assert signal.skipped is not None
            assert "only 100 predictions" in signal.skipped
    assert summary.performance is not None
    assert summary.performance.rows == 100


def test_report_tests_run_on_a_seeded_sample_of_each_side(
    monitor_settings: Settings, make_window: WindowFactory
) -> None:
    sampled = DriftMonitor(monitor_settings.model_copy(update={"drift_sample_rows": 200}))
    window = make_window(same_texts(300))

    first = sampled.evaluate(window).summary
    again = sampled.evaluate(window).summary

    assert first.current_rows == 300
    assert first.reference_rows > 200
    text = next(s for s in first.signals if s.name == "text_content")
    assert text.current_rows == 200
    assert first.verdict == "no_drift", first.message
    # Seeded: the same window gives the same scores.
    assert [s.score for s in first.signals] == [s.score for s in again.signals]
