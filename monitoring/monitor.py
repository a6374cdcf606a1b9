"""One drift run: current window against the champion's reference, persisted, targeted, alerted.

Embeddings on both sides come from the fixed drift encoder (``flywheel.encoder``), not from the champion: the
window's are read from the store (the ingestion process embedded them), so a report embeds only the rows still
missing one, and a promotion neither changes the space nor leaves the stored window useless.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pandas as pd
from sqlalchemy.exc import SQLAlchemyError

from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.embedding import store_embeddings
from flywheel.encoder import DriftEncoder
from flywheel.events import AlertEvent
from flywheel.publisher import EventPublisher
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.runtime import load_classifier
from flywheel.settings import Settings
from monitoring.descriptors import VocabularyShare
from monitoring.drift import DriftAnalyzer
from monitoring.embeddings import WindowEmbeddings, window_embeddings
from monitoring.errors import MonitoringError
from monitoring.label_share import compare_label_shares, label_share_alerts
from monitoring.metrics import drift_metrics
from monitoring.performance import Calibration, PerformanceEstimator
from monitoring.reference import ReferenceCache, ReferenceSet
from monitoring.reports import DriftSummary, ReportArchive, standalone_page, with_summary
from monitoring.store import DriftStore, report_row
from monitoring.targeting import unlike_reference
from monitoring.window import CurrentWindow, WindowReader

logger = logging.getLogger(__name__)

#: Reference texts the targeting classifier learns from (a sample keeps it fast on large references).
TARGETING_REFERENCE_ROWS = 5000


@dataclass
class DriftOutcome:
    """A finished analysis before anything is stored: summary, HTML and the rows to label first."""

    summary: DriftSummary
    html: str
    targets: pd.DataFrame = field(default_factory=pd.DataFrame)


class DriftMonitor:
    """Analyses a window with the serving model; keeps the loaded model between scheduled runs."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry | None = None,
        database: Database | None = None,
        publisher: EventPublisher | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self.database = database
        self.publisher = publisher
        self.archive = ReportArchive(settings.home)
        self.references = ReferenceCache(settings)
        self.estimator = PerformanceEstimator(settings)
        self.analyzer = DriftAnalyzer(settings)
        self._classifier: Classifier | None = None
        self._encoder: DriftEncoder | None = None

    def encoder(self) -> DriftEncoder:
        """The drift encoder, loaded once: the same for every model version."""
        if self._encoder is None:
            self._set_threads()
            self._encoder = DriftEncoder.load(self.settings)
        return self._encoder

    def _set_threads(self) -> None:
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)

    def classifier(self, entry: ModelVersion) -> Classifier:
        """The classifier of ``entry``, loaded once per version."""
        if self._classifier is None or self._classifier.version != entry.version:
            self._set_threads()
            # The runtime the service serves in, so the reference's predictions are the ones traffic gets.
            self._classifier = load_classifier(entry, self.settings)
        return self._classifier

    def prepare(self, entry: ModelVersion) -> tuple[Classifier, ReferenceSet, Calibration | None]:
        """Load the model, its cached reference and its calibration, building what is missing."""
        classifier = self.classifier(entry)
        reference = self.references.load(entry, classifier, self.encoder())
        return classifier, reference, self.estimator.calibration(entry.version, classifier)

    def evaluate(self, window: CurrentWindow, entry: ModelVersion | None = None) -> DriftOutcome:
        """Analyse ``window`` against the reference of ``entry`` (default: the champion)."""
        s = self.settings
        started = time.perf_counter()
        entry = entry or self.registry.champion_version()
        frame = window.frame.reset_index(drop=True)
        served_mask = (frame["model_version"] == entry.version).to_numpy()
        summary = DriftSummary(
            verdict="insufficient_data",
            model_version=entry.version,
            window_start=window.start,
            window_end=window.end,
            window_rule=window.rule,
            current_rows=len(frame),
            served_rows=int(served_mask.sum()),
            feedback_rows=int(frame["feedback_label"].notna().sum()),
            min_rows=s.drift_min_rows,
            min_signals=s.drift_min_signals,
        )
        if len(frame) < s.drift_min_rows:
            summary.message = (
                f"insufficient data: {len(frame)} predictions in the window, at least {s.drift_min_rows} are needed "
                "(FLYWHEEL_DRIFT_MIN_ROWS); no verdict"
            )
            summary.duration_seconds = round(time.perf_counter() - started, 3)
            logger.info("drift run %s: %s", summary.report_id, summary.message)
            return DriftOutcome(summary=summary, html=standalone_page(summary))

        t0 = time.perf_counter()
        classifier, reference, calibration = self.prepare(entry)
        t1 = time.perf_counter()
        embedded = self.window_embeddings(window, frame)
        summary.embeddings_stored, summary.embeddings_computed = embedded.stored, embedded.embedded
        embeddings = embedded.vectors
        t2 = time.perf_counter()
        tokenizer = classifier.tokenizer
        vocabulary = VocabularyShare(tokenizer.get_vocab(), lowercase=bool(getattr(tokenizer, "do_lower_case", False)))
        current = frame.assign(
            predicted=frame["predicted"].where(served_mask, None),
            confidence=frame["confidence"].where(served_mask, None),
        )
        analysis = self.analyzer.analyze(reference, current, embeddings, vocabulary)
        t3 = time.perf_counter()
        summary.verdict = analysis.verdict
        summary.reference_rows = len(reference.frame)
        summary.drift_score = analysis.drift_score
        summary.signals = analysis.signals
        summary.fired = analysis.fired
        summary.performance = self.estimator.estimate(calibration, frame[served_mask])
        # Only the champion's own predictions, as on the reference side: another version's labels are no shift.
        summary.label_share = compare_label_shares(
            reference.frame["predicted"].astype(str).tolist(),
            frame.loc[served_mask, ["predicted", "text"]],
            classifier.labels,
            max_diff=s.drift_label_share_max_diff,
            min_z=s.drift_label_share_min_z,
            min_rows=s.drift_min_rows,
        )
        shifted = summary.label_share.describe()
        summary.message = (
            f"{len(analysis.fired)} of {sum(sig.score is not None for sig in analysis.signals)} signals fired"
            + (f": {', '.join(analysis.fired)}" if analysis.fired else "")
            + (f"; {shifted}" if shifted else "")
        )
        targets = pd.DataFrame()
        if analysis.verdict == "drifted" and s.drift_targeted_labels > 0:
            texts = reference.frame["text"]
            if len(texts) > TARGETING_REFERENCE_ROWS:
                texts = texts.sample(TARGETING_REFERENCE_ROWS, random_state=s.seed)
            targets = unlike_reference(
                texts.astype(str).tolist(), frame[["prediction_id", "text"]], s.drift_targeted_labels, s.seed
            )
            summary.targeted = targets["prediction_id"].astype(str).tolist()
        t4 = time.perf_counter()
        summary.drift_encoder = self.encoder().encoder_id
        summary.timings = {
            "reference_seconds": round(t1 - t0, 3),
            "embedding_seconds": round(t2 - t1, 3),
            "evidently_seconds": round(t3 - t2, 3),
            "targeting_seconds": round(t4 - t3, 3),
        }
        summary.duration_seconds = round(time.perf_counter() - started, 3)
        html = with_summary(analysis.snapshot.get_html_str(as_iframe=False), summary)
        return DriftOutcome(summary=summary, html=html, targets=targets)

    def window_embeddings(self, window: CurrentWindow, frame: pd.DataFrame) -> WindowEmbeddings:
        """The window's drift embeddings: stored ones read, the missing ones embedded now (and stored if possible)."""
        encoder = self.encoder()
        ids = frame["prediction_id"].astype(str).tolist()
        stored = window.embeddings if window.encoder_id == encoder.encoder_id else {}
        result, missing = window_embeddings(encoder, ids, frame["text"].astype(str).tolist(), stored)
        if result.embedded:
            logger.info(
                "drift report embedded %d of %d window texts without a stored embedding in %.1fs",
                result.embedded,
                len(ids),
                result.seconds,
            )
            if self.database is not None and window.encoder_id is not None:
                # Stored for the next report; the background embedder would otherwise redo them.
                try:
                    store_embeddings(self.database, encoder, [ids[i] for i in missing], result.vectors[missing])
                except SQLAlchemyError as exc:
                    logger.warning("could not store the %d embeddings this report made: %s", result.embedded, exc)
        return result

    def run(self, window: CurrentWindow | None = None) -> DriftSummary:
        """One full run: read the window, analyse, store files and row, rank targets, alert, update gauges."""
        s = self.settings
        if window is None:
            if self.database is None:
                raise MonitoringError("no database to read the current window from")
            window = WindowReader(self.database).load(
                s.drift_window_hours, s.drift_window_max_rows, encoder_id=self.encoder().encoder_id
            )
        outcome = self.evaluate(window)
        summary = outcome.summary
        alerts: list[AlertEvent] = []
        if summary.verdict == "drifted":
            alert = AlertEvent(
                report_id=summary.report_id,
                model_version=summary.model_version,
                drift_score=summary.drift_score or 0.0,
                signals={
                    sig.name: {"method": sig.method, "score": sig.score, "threshold": sig.threshold}
                    for sig in summary.signals
                    if sig.drifted
                },
                current_rows=summary.current_rows,
                reference_rows=summary.reference_rows,
            )
            alerts.append(alert)
            if self.publisher is not None:
                summary.alert_event_id = alert.event_id
        if summary.label_share is not None:
            label_alerts = label_share_alerts(summary.report_id, summary.model_version, summary.label_share)
            if self.publisher is not None:
                for share, label_alert in zip(summary.label_share.shifted, label_alerts, strict=True):
                    share.alert_event_id = label_alert.event_id
            alerts.extend(label_alerts)
        # Files first, then the row that lists them, then the alert that points at both.
        self.archive.save(summary, outcome.html)
        if self.database is not None:
            store = DriftStore(self.database)
            store.add(summary, outcome.targets)
            store.prune(s.drift_keep_reports)
        self.archive.prune(s.drift_keep_reports)
        for alert in alerts:
            logger.warning("%s", alert.describe())
            if self.publisher is not None:
                self.publisher.publish(alert)
        drift_metrics().observe(report_row(summary))
        logger.info(
            "drift report %s: %s in %.1fs (%s)",
            summary.report_id,
            summary.verdict,
            summary.duration_seconds,
            self.archive.path(summary.report_id),
        )
        return summary
