"""Drift reports and drift targets in the Flywheel database."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import delete
from sqlmodel import col, func, select

from flywheel.database import Database
from flywheel.models.drift import DriftReport, DriftReportCreate, DriftReportPublic, DriftTarget, DriftTargetPublic
from flywheel.models.feedback import Feedback, FeedbackStatus, Prediction
from monitoring.errors import MonitoringError
from monitoring.reports import DriftSummary


def report_row(summary: DriftSummary) -> DriftReportCreate:
    """The database row of a drift summary."""
    perf = summary.performance
    return DriftReportCreate(
        report_id=summary.report_id,
        created_at=summary.created_at,
        verdict=summary.verdict,
        model_version=summary.model_version,
        window_start=summary.window_start,
        window_end=summary.window_end,
        window_rule=summary.window_rule[:200],
        current_rows=summary.current_rows,
        served_rows=summary.served_rows,
        feedback_rows=summary.feedback_rows,
        reference_rows=summary.reference_rows,
        drift_score=summary.drift_score,
        fired=summary.fired,
        signals={
            s.name: {
                "method": s.method,
                "score": s.score,
                "threshold": s.threshold,
                "drifted": s.drifted,
                "skipped": s.skipped,
            }
            for s in summary.signals
        },
        estimated_accuracy=perf.estimated_accuracy if perf else None,
        realised_accuracy=perf.realised_accuracy if perf else None,
        targeted=len(summary.targeted),
        alert_event_id=summary.alert_event_id,
        duration_seconds=summary.duration_seconds,
        message=summary.message[:1000],
    )


def public(row: DriftReport) -> DriftReportPublic:
    """A report row as the API lists it."""
    return DriftReportPublic.model_validate(
        row, from_attributes=True, update={"html_url": f"/drift/reports/{row.report_id}"}
    )


class DriftStore:
    """Index of drift runs, and the targeted predictions that jump the review queue."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def add(self, summary: DriftSummary, targets: pd.DataFrame | None = None) -> None:
        """Index one run and (re)rank its targeted predictions, in one transaction."""
        row = DriftReport.model_validate(report_row(summary))
        with self.database.session() as session:
            session.add(row)
            if targets is not None and not targets.empty:
                ids = targets["prediction_id"].astype(str).tolist()
                # A prediction targeted again takes the newest report's score.
                session.execute(delete(DriftTarget).where(col(DriftTarget.prediction_id).in_(ids)))
                for prediction_id, score in zip(ids, targets["drift_score"].astype(float), strict=True):
                    session.add(
                        DriftTarget(
                            prediction_id=prediction_id,
                            report_id=summary.report_id,
                            drift_score=score,
                            created_at=summary.created_at,
                        )
                    )

    def prune(self, keep: int) -> int:
        """Delete all but the newest ``keep`` reports, and the targets of deleted reports; returns how many."""
        with self.database.session() as session:
            kept = select(DriftReport.report_id).order_by(col(DriftReport.created_at).desc()).limit(keep)
            kept_ids = list(session.exec(kept))
            if not kept_ids:
                return 0
            result = session.execute(delete(DriftReport).where(col(DriftReport.report_id).not_in(kept_ids)))
            session.execute(delete(DriftTarget).where(col(DriftTarget.report_id).not_in(kept_ids)))
        return int(getattr(result, "rowcount", 0) or 0)

    def recent(self, limit: int = 100, offset: int = 0) -> list[DriftReportPublic]:
        """Reports, newest first."""
        with self.database.read_session() as session:
            rows = session.exec(
                select(DriftReport).order_by(col(DriftReport.created_at).desc()).offset(offset).limit(limit)
            )
            return [public(r) for r in rows]

    def count(self) -> int:
        """How many reports are indexed."""
        with self.database.read_session() as session:
            return int(session.exec(select(func.count()).select_from(DriftReport)).one())

    def get(self, report_id: str) -> DriftReportPublic:
        """One report's row."""
        with self.database.read_session() as session:
            row = session.get(DriftReport, report_id)
            if row is None:
                raise MonitoringError(f"no drift report {report_id}")
            return public(row)

    def latest(self) -> DriftReportPublic | None:
        """The newest report, if any."""
        rows = self.recent(limit=1)
        return rows[0] if rows else None

    def targets(self, limit: int = 50) -> list[DriftTargetPublic]:
        """Targeted predictions nobody has labeled yet: newest report first, most unlike the reference first."""
        labeled = select(Feedback.prediction_id).where(
            col(Feedback.prediction_id).is_not(None), col(Feedback.status) != FeedbackStatus.REJECTED
        )
        with self.database.read_session() as session:
            rows = session.exec(
                select(DriftTarget, Prediction)
                .join(Prediction, col(Prediction.prediction_id) == col(DriftTarget.prediction_id))
                .where(col(DriftTarget.prediction_id).not_in(labeled))
                .order_by(col(DriftTarget.created_at).desc(), col(DriftTarget.drift_score).desc())
                .limit(limit)
            )
            return [
                DriftTargetPublic(
                    prediction_id=target.prediction_id,
                    report_id=target.report_id,
                    drift_score=target.drift_score,
                    created_at=target.created_at,
                    text=prediction.text,
                    label=prediction.label,
                    confidence=prediction.confidence,
                )
                for target, prediction in rows
            ]
