"""Prometheus gauges of the latest drift report (multiprocess-safe inside the BentoML service)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from flywheel.models.drift import DriftReportBase

#: Value of ``flywheel_drift_detected`` per verdict; insufficient data is neither drift nor its absence.
VERDICT_VALUE = {"no_drift": 0.0, "drifted": 1.0, "insufficient_data": -1.0}


@dataclass(frozen=True)
class DriftMetrics:
    """Gauges set from the newest report: the same values whichever process reads them."""

    detected: Any
    score: Any
    signal_score: Any
    signal_threshold: Any
    current_rows: Any
    estimated_accuracy: Any
    realised_accuracy: Any
    report_timestamp: Any

    def observe(self, row: DriftReportBase) -> None:
        """Publish a report's verdict and scores (a fresh run's, or the newest indexed one)."""
        nan = float("nan")
        self.detected.set(VERDICT_VALUE[row.verdict])
        self.score.set(row.drift_score if row.drift_score is not None else nan)
        self.current_rows.set(row.current_rows)
        self.estimated_accuracy.set(row.estimated_accuracy if row.estimated_accuracy is not None else nan)
        self.realised_accuracy.set(row.realised_accuracy if row.realised_accuracy is not None else nan)
        self.report_timestamp.set(row.created_at.timestamp())
        for name, signal in row.signals.items():
            if signal.get("score") is not None:
                self.signal_score.labels(signal=name).set(float(signal["score"]))
                self.signal_threshold.labels(signal=name).set(float(signal["threshold"]))


@functools.cache
def drift_metrics() -> DriftMetrics:
    """The process's gauges, created on first use (after BentoML set PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import Gauge

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        # Every worker reads the same newest report, so the freshest value (max) is the right merge.
        return Gauge(name, doc, labels, multiprocess_mode="livemax")

    return DriftMetrics(
        detected=gauge(
            "flywheel_drift_detected", "Verdict of the latest drift report: 1 drifted, 0 not, -1 too few rows."
        ),
        score=gauge("flywheel_drift_score", "Share of drift signals that fired in the latest report."),
        signal_score=gauge(
            "flywheel_drift_signal_score", "Score of each drift signal in the latest report.", ("signal",)
        ),
        signal_threshold=gauge(
            "flywheel_drift_signal_threshold", "Threshold each drift signal's score is compared with.", ("signal",)
        ),
        current_rows=gauge("flywheel_drift_current_rows", "Predictions in the latest report's window."),
        estimated_accuracy=gauge(
            "flywheel_drift_estimated_accuracy", "Accuracy estimated from calibrated confidence (CBPE), latest window."
        ),
        realised_accuracy=gauge(
            "flywheel_drift_realised_accuracy", "Accuracy on accepted feedback in the latest window (biased low)."
        ),
        report_timestamp=gauge("flywheel_drift_report_timestamp_seconds", "Unix time of the latest drift report."),
    )
