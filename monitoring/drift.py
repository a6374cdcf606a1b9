"""The Evidently drift report of a current window against a reference, its signals and the verdict."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.core.metric_types import Metric
from evidently.core.report import Snapshot
from evidently.legacy.metrics.data_drift import embeddings_drift
from evidently.legacy.tests.base_test import TestStatus
from evidently.metrics import EmbeddingsDrift, ValueDrift
from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod
from pydantic import BaseModel
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import ThreadpoolController

from flywheel.settings import Settings
from monitoring.descriptors import NAMES as DESCRIPTOR_NAMES
from monitoring.descriptors import VocabularyShare, text_descriptors
from monitoring.errors import MonitoringError
from monitoring.reference import ReferenceSet

logger = logging.getLogger(__name__)


class PCAProjection:
    """Evidently's t-SNE call served by PCA: the same picture's axes in milliseconds instead of seconds."""

    def __init__(self, n_components: int = 2, **_: object) -> None:
        self.n_components = n_components

    def fit_transform(self, data: pd.DataFrame) -> np.ndarray:
        """Project ``data`` onto its first principal components."""
        return np.asarray(PCA(n_components=self.n_components, random_state=0).fit_transform(data))


EMBEDDING_METHODS = {
    "model": ModelDriftMethod,
    "distance": DistanceDriftMethod,
    "ratio": RatioDriftMethod,
    "mmd": MMDDriftMethod,
}
#: How the report's embeddings picture is drawn in two dimensions (Evidently's own is t-SNE).
PROJECTIONS: dict[str, type] = {"pca": PCAProjection, "tsne": TSNE}
EMBEDDING = "embedding"
SignalKind = Literal["text", "embeddings", "descriptor", "prediction", "feedback"]
Verdict = Literal["drifted", "no_drift", "insufficient_data"]


class Signal(BaseModel):
    """One drift test: what was compared, with which method, its score against its threshold."""

    name: str
    kind: SignalKind
    column: str
    method: str
    threshold: float
    score: float | None = None
    drifted: bool = False
    current_rows: int = 0
    skipped: str | None = None


@dataclass
class DriftAnalysis:
    """An analysed window: signals, verdict, drift score and the Evidently snapshot behind them."""

    signals: list[Signal]
    verdict: Verdict
    drift_score: float
    snapshot: Snapshot
    evidently_seconds: float

    @property
    def fired(self) -> list[str]:
        """Names of the signals that detected drift."""
        return [s.name for s in self.signals if s.drifted]


def current_columns() -> list[str]:
    """Columns a current window frame must have (``predicted``/``confidence``/``feedback_label`` may be null)."""
    return ["text", "predicted", "confidence", "feedback_label"]


class DriftAnalyzer:
    """Builds one Evidently report with every signal and turns its results into a verdict."""

    def __init__(self, settings: Settings) -> None:
        if settings.drift_embedding_method not in EMBEDDING_METHODS:
            raise MonitoringError(
                f"unknown FLYWHEEL_DRIFT_EMBEDDING_METHOD {settings.drift_embedding_method!r}: "
                f"use one of {', '.join(EMBEDDING_METHODS)}"
            )
        if settings.drift_embedding_projection not in PROJECTIONS:
            raise MonitoringError(
                f"unknown FLYWHEEL_DRIFT_EMBEDDING_PROJECTION {settings.drift_embedding_projection!r}: "
                f"use one of {', '.join(PROJECTIONS)}"
            )
        self.settings = settings

    def analyze(
        self,
        reference: ReferenceSet,
        current: pd.DataFrame,
        current_embeddings: np.ndarray,
        vocabulary: VocabularyShare,
    ) -> DriftAnalysis:
        """Compare ``current`` (rows of ``current_columns()``) with ``reference``; needs enough current rows."""
        s = self.settings
        missing = set(current_columns()) - set(current.columns)
        if missing:
            raise MonitoringError(f"current window lacks columns {sorted(missing)}")
        if len(current) != current_embeddings.shape[0]:
            raise MonitoringError("current window and its embeddings differ in length")
        dims = reference.embeddings.shape[1]
        if current_embeddings.shape[1] != dims:
            raise MonitoringError(
                f"current embeddings have {current_embeddings.shape[1]} dimensions, the reference {dims}: "
                "they were made by different encoders"
            )
        emb_columns = [f"emb_{i}" for i in range(dims)]
        ref_frame = _with_embeddings(
            pd.DataFrame(
                {
                    "text": reference.frame["text"].astype(str),
                    "predicted": reference.frame["predicted"].astype(str),
                    "confidence": reference.frame["confidence"].astype(float),
                    "feedback_label": reference.frame["label"].astype(str),
                }
            ),
            reference.embeddings,
            emb_columns,
        )
        cur_frame = _with_embeddings(
            pd.DataFrame(
                {
                    "text": current["text"].astype(str).to_numpy(),
                    "predicted": current["predicted"].astype(object).to_numpy(),
                    "confidence": pd.to_numeric(current["confidence"], errors="coerce").to_numpy(),
                    "feedback_label": current["feedback_label"].astype(object).to_numpy(),
                }
            ),
            current_embeddings,
            emb_columns,
        )
        ref_frame = _sample(ref_frame, s.drift_sample_rows, s.seed)
        cur_frame = _sample(cur_frame, s.drift_sample_rows, s.seed)
        served = int(cur_frame["predicted"].notna().sum())
        labelled = int(cur_frame["feedback_label"].notna().sum())

        signals: list[Signal] = [
            Signal(
                name="text_content",
                kind="text",
                column="text",
                method=s.drift_text_method,
                threshold=s.drift_text_threshold,
                current_rows=len(cur_frame),
            ),
            Signal(
                name="embeddings",
                kind="embeddings",
                column=EMBEDDING,
                method=s.drift_embedding_method,
                threshold=s.drift_embedding_threshold,
                current_rows=len(cur_frame),
            ),
            *[
                Signal(
                    name=f"descriptor.{name}",
                    kind="descriptor",
                    column=name,
                    method=s.drift_numeric_method,
                    threshold=s.drift_numeric_threshold,
                    current_rows=len(cur_frame),
                )
                for name in DESCRIPTOR_NAMES
            ],
            Signal(
                name="prediction.label",
                kind="prediction",
                column="predicted",
                method=s.drift_label_method,
                threshold=s.drift_label_threshold,
                current_rows=served,
            ),
            Signal(
                name="prediction.confidence",
                kind="prediction",
                column="confidence",
                method=s.drift_confidence_method,
                threshold=s.drift_confidence_threshold,
                current_rows=served,
            ),
            Signal(
                name="feedback.label",
                kind="feedback",
                column="feedback_label",
                method=s.drift_label_method,
                threshold=s.drift_label_threshold,
                current_rows=labelled,
            ),
        ]
        for signal in signals:
            if signal.kind == "prediction" and served < s.drift_min_rows:
                signal.skipped = (
                    f"only {served} predictions of model {reference.version} in the window (< {s.drift_min_rows})"
                )
            if signal.kind == "feedback" and labelled < s.drift_min_feedback_rows:
                signal.skipped = (
                    f"only {labelled} accepted feedback labels in the window (< {s.drift_min_feedback_rows})"
                )

        metrics: dict[str, Metric] = {}
        for signal in signals:
            if signal.skipped:
                continue
            if signal.kind == "embeddings":
                method = EMBEDDING_METHODS[s.drift_embedding_method](threshold=signal.threshold)
                metrics[signal.name] = EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=method)
            else:
                metrics[signal.name] = ValueDrift(
                    column=signal.column, method=signal.method, threshold=signal.threshold
                )

        definition = DataDefinition(
            text_columns=["text"],
            numerical_columns=["confidence"],
            categorical_columns=["predicted", "feedback_label"],
            embeddings={EMBEDDING: emb_columns},
        )
        descriptors = text_descriptors("text", vocabulary)
        # Evidently draws a t-SNE picture of up to 2,500 embeddings per side; t-SNE takes seconds even for a few
        # hundred points and would dominate the report's time, so the picture shows fewer rows, by default through
        # PCA. Only the picture: the drift score uses every sampled row.
        embeddings_drift.SAMPLE_CONSTANT = s.drift_embedding_plot_rows
        embeddings_drift.TSNE = PROJECTIONS[s.drift_embedding_projection]
        started = time.perf_counter()
        try:
            ref_dataset = Dataset.from_pandas(ref_frame, data_definition=definition, descriptors=descriptors)
            cur_dataset = Dataset.from_pandas(cur_frame, data_definition=definition, descriptors=descriptors)
            report = Report(
                list(metrics.values()),
                include_tests=True,
                metadata={"model_version": reference.version},
                tags=["flywheel", "drift"],
            )
            with _single_threaded_sklearn():
                snapshot = report.run(cur_dataset, ref_dataset)
        except (ValueError, KeyError, TypeError) as exc:
            raise MonitoringError(f"Evidently could not build the drift report: {exc}") from exc
        seconds = time.perf_counter() - started

        for signal in signals:
            metric = metrics.get(signal.name)
            if metric is None:
                continue
            result = snapshot.context.get_metric_result(metric)
            signal.score = float(result.to_simple_dict())
            if signal.kind == "embeddings":
                signal.drifted = signal.score > signal.threshold
            else:
                # Evidently decides per method whether high scores or low p-values mean drift.
                signal.drifted = any(t.status == TestStatus.FAIL for t in result.tests)
        tested = [sig for sig in signals if sig.score is not None]
        fired = [sig for sig in tested if sig.drifted]
        verdict: Verdict = "drifted" if len(fired) >= s.drift_min_signals else "no_drift"
        score = len(fired) / len(tested) if tested else 0.0
        logger.info(
            "drift analysis of %d current vs %d reference rows (sampled from %d and %d): %s (%s) in %.1fs",
            len(cur_frame),
            len(ref_frame),
            len(current),
            len(reference.frame),
            verdict,
            ", ".join(sig.name for sig in fired) or "no signal fired",
            seconds,
        )
        return DriftAnalysis(
            signals=signals, verdict=verdict, drift_score=round(score, 4), snapshot=snapshot, evidently_seconds=seconds
        )


def _sample(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    # Every test's verdict is stable well below 10,000 rows a side, while Evidently's time grows with the rows:
    # a seeded uniform sample keeps the report fast and repeatable.
    if len(frame) <= rows:
        return frame
    return frame.sample(rows, random_state=seed).sort_index()


def _with_embeddings(frame: pd.DataFrame, embeddings: np.ndarray, columns: list[str]) -> pd.DataFrame:
    return pd.concat([frame, pd.DataFrame(embeddings, columns=columns, index=frame.index)], axis=1)


@contextmanager
def _single_threaded_sklearn() -> Iterator[None]:
    # t-SNE's OpenMP threads spin-wait and slow down several-fold when the cores are shared (the service or
    # other jobs run beside this); one thread is about as fast on an idle machine at this size. Only
    # scikit-learn's OpenMP runtime is limited, so torch inference in the same process keeps its threads.
    controller = ThreadpoolController()
    libraries = controller.lib_controllers
    paths = [lib.filepath for lib in libraries if lib.user_api == "openmp" and "scikit_learn" in lib.filepath]
    if not paths:
        yield
        return
    with controller.select(filepath=paths).limit(limits=1):
        yield
