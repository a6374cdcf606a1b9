"""Accuracy estimated without labels from calibrated confidence (CBPE), beside the accuracy feedback shows."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from pydantic import BaseModel
from sklearn.isotonic import IsotonicRegression

from flywheel.classifier import Classifier
from flywheel.holdout import GoldenHoldout
from flywheel.settings import Settings
from flywheel.storage import atomic_write_text
from monitoring.reference import predict_frame

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
FEEDBACK_NOTE = (
    "Accepted feedback over-samples wrong predictions (people correct mistakes more than they confirm "
    "successes), so the realised accuracy on feedback is biased low; the estimate covers every prediction."
)


class Calibration(BaseModel):
    """Isotonic map from the model's top-class confidence to its chance of being right, fit on the holdout."""

    version: str
    holdout_sha256: str
    rows: int
    holdout_accuracy: float
    holdout_confidence: float
    confidence: list[float]
    accuracy: list[float]

    def expected(self, confidence: np.ndarray) -> np.ndarray:
        """Probability each prediction is correct, given its confidence."""
        return np.interp(confidence, self.confidence, self.accuracy)


class PerformanceEstimate(BaseModel):
    """Estimated and realised accuracy of the serving model on the current window."""

    method: str = "CBPE: mean calibrated confidence (isotonic calibration on the golden holdout)"
    rows: int
    estimated_accuracy: float | None = None
    estimated_low: float | None = None
    estimated_high: float | None = None
    mean_confidence: float | None = None
    holdout_accuracy: float | None = None
    realised_accuracy: float | None = None
    realised_rows: int = 0
    note: str = FEEDBACK_NOTE


class PerformanceEstimator:
    """Calibrates a model version on the golden holdout (cached) and estimates window accuracy."""

    def __init__(self, settings: Settings, batch_size: int = 64) -> None:
        self.holdout = GoldenHoldout(settings.home / "holdout")
        self.directory = settings.home / "monitoring" / "reference"
        self.batch_size = batch_size

    def calibration(self, version: str, classifier: Classifier) -> Calibration | None:
        """The version's calibration, fit once per holdout; None without a holdout."""
        if not self.holdout.exists():
            logger.warning("no golden holdout: accuracy cannot be estimated without labels")
            return None
        info = self.holdout.info()
        path = self.directory / version / CALIBRATION_FILE
        if path.is_file():
            cached = Calibration.model_validate_json(path.read_text())
            if cached.holdout_sha256 == info.sha256:
                return cached
        holdout = self.holdout.load()
        predicted = predict_frame(classifier, holdout["text"].astype(str).tolist(), self.batch_size)
        correct = (predicted["predicted"].to_numpy() == holdout["label"].astype(str).to_numpy()).astype(float)
        confidence = predicted["confidence"].to_numpy()
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(confidence, correct)
        calibration = Calibration(
            version=version,
            holdout_sha256=info.sha256,
            rows=len(holdout),
            holdout_accuracy=round(float(correct.mean()), 6),
            holdout_confidence=round(float(confidence.mean()), 6),
            confidence=[float(x) for x in iso.X_thresholds_],
            accuracy=[float(y) for y in iso.y_thresholds_],
        )
        atomic_write_text(path, calibration.model_dump_json(indent=2))
        logger.info(
            "calibrated %s on %d holdout rows: accuracy %.4f, mean confidence %.4f",
            version,
            calibration.rows,
            calibration.holdout_accuracy,
            calibration.holdout_confidence,
        )
        return calibration

    @staticmethod
    def estimate(calibration: Calibration | None, served: pd.DataFrame) -> PerformanceEstimate:
        """Estimate over ``served`` (``predicted``, ``confidence``, ``feedback_label`` of the calibrated model)."""
        confidence = pd.to_numeric(served["confidence"], errors="coerce").dropna().to_numpy()
        labelled = served[served["feedback_label"].notna()]
        realised = (
            float((labelled["feedback_label"].astype(str) == labelled["predicted"].astype(str)).mean())
            if len(labelled)
            else None
        )
        estimate = PerformanceEstimate(
            rows=len(confidence),
            mean_confidence=round(float(confidence.mean()), 6) if len(confidence) else None,
            realised_accuracy=round(realised, 6) if realised is not None else None,
            realised_rows=len(labelled),
        )
        if calibration is None or not len(confidence):
            return estimate
        expected = calibration.expected(confidence)
        accuracy = float(expected.mean())
        # Each prediction is right with its own probability: the count of right ones is Poisson-binomial.
        spread = 1.96 * math.sqrt(float((expected * (1 - expected)).sum())) / len(expected)
        estimate.estimated_accuracy = round(accuracy, 6)
        estimate.estimated_low = round(max(0.0, accuracy - spread), 6)
        estimate.estimated_high = round(min(1.0, accuracy + spread), 6)
        estimate.holdout_accuracy = calibration.holdout_accuracy
        return estimate
