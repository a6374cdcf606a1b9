"""Feedback statistics: counts by status, label and source, vetting flags, and model agreement."""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel, Field, computed_field
from rich.console import Group
from rich.table import Table
from sqlalchemy import case, func
from sqlalchemy import select as sa_select
from sqlmodel import col, select

from feedback.vetting import Vetter
from flywheel.database import Database
from flywheel.label_set import LabelSet
from flywheel.models.feedback import Feedback, FeedbackSource, FeedbackSourcePublic, Prediction


class SourceStats(FeedbackSourcePublic):
    """A source's reliability plus its feedback counts by status."""

    by_status: dict[str, int] = Field(default_factory=dict)


class FeedbackStats(BaseModel):
    """The state of the feedback store at one moment."""

    predictions: int
    feedback: int
    by_status: dict[str, int]
    by_label: dict[str, int]
    sources: list[SourceStats]
    label_issues: int
    conflicts: int
    awaiting_prediction: int
    with_evidence: int
    agreeing: int
    #: Feedback refused because no model or admin allowed its label, by label name (``flywheel labels add``).
    refused_labels: dict[str, int] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def agreement_rate(self) -> float | None:
        """Share of judged feedback whose label equals the model's prediction (1 - correction rate)."""
        return self.agreeing / self.with_evidence if self.with_evidence else None

    def render(self) -> Group:
        """Rich tables for the CLI."""
        summary = Table("measure", "value", title="feedback store")
        rate = self.agreement_rate
        for name, value in (
            ("predictions ingested", str(self.predictions)),
            ("feedback", str(self.feedback)),
            ("possible label errors", str(self.label_issues)),
            ("conflicting labels", str(self.conflicts)),
            ("waiting for their prediction", str(self.awaiting_prediction)),
            ("model agreement", f"{rate:.1%} of {self.with_evidence}" if rate is not None else "-"),
        ):
            summary.add_row(name, value)
        statuses = Table("status", "count", title="by status")
        for status, count in sorted(self.by_status.items()):
            statuses.add_row(status, str(count))
        labels = Table("label", "count", title="by label")
        for label, count in sorted(self.by_label.items()):
            labels.add_row(label, str(count))
        sources = Table("source", "feedback", "by status", "scored", "label errors", "reliability", "state",
                        title="by source")
        for source in self.sources:
            state = "trusted" if source.trusted else ""
            if source.quarantined:
                state = f"QUARANTINED: {source.quarantine_reason}"
            sources.add_row(
                source.source,
                str(sum(source.by_status.values())),
                ", ".join(f"{k}={v}" for k, v in sorted(source.by_status.items())),
                str(source.scored),
                str(source.label_issues),
                f"{source.reliability:.2f}",
                state,
            )
        parts = [summary, statuses, labels, sources]
        if self.refused_labels:
            refused = Table("label", "refused", title="refused labels (allow one with `flywheel labels add NAME`)")
            for label, count in sorted(self.refused_labels.items(), key=lambda item: (-item[1], item[0])):
                refused.add_row(label, str(count))
            parts.append(refused)
        return Group(*parts)


def feedback_stats(database: Database, vetter: Vetter) -> FeedbackStats:
    """Compute the statistics with a handful of aggregate queries."""
    with database.read_session() as session:
        predictions = session.exec(select(func.count()).select_from(Prediction)).one()
        by_source_status: dict[str, dict[str, int]] = defaultdict(dict)
        by_status: dict[str, int] = defaultdict(int)
        for source, status, count in session.exec(
            select(Feedback.source, Feedback.status, func.count()).group_by(
                col(Feedback.source), col(Feedback.status)
            )
        ):
            by_source_status[source][status] = count
            by_status[status] += count
        by_label = {
            label: count
            for label, count in session.exec(
                select(Feedback.label, func.count()).group_by(col(Feedback.label))
            )
        }
        flags = session.execute(
            sa_select(
                func.count(),
                func.coalesce(func.sum(case((col(Feedback.label_issue), 1), else_=0)), 0),
                func.coalesce(func.sum(case((col(Feedback.conflict), 1), else_=0)), 0),
                func.coalesce(
                    func.sum(case((col(Feedback.prediction_id).is_not(None) & col(Feedback.text).is_(None), 1),
                                  else_=0)),
                    0,
                ),
                func.count(col(Feedback.model_label)),
                func.coalesce(func.sum(case((col(Feedback.model_label) == col(Feedback.label), 1), else_=0)), 0),
            )
        ).one()
        sources = []
        for row in session.exec(select(FeedbackSource).order_by(col(FeedbackSource.source))):
            stats = SourceStats.model_validate(row, from_attributes=True)
            stats.trusted = vetter.is_trusted(row)
            stats.by_status = by_source_status.get(row.source, {})
            sources.append(stats)
    total, issues, conflicts, awaiting, judged, agreeing = (int(v) for v in flags)
    refused = LabelSet(database).refusals()
    return FeedbackStats(
        predictions=predictions,
        feedback=total,
        by_status=dict(by_status),
        by_label=by_label,
        sources=sources,
        label_issues=issues,
        conflicts=conflicts,
        awaiting_prediction=awaiting,
        with_evidence=judged,
        agreeing=agreeing,
        refused_labels=refused,
    )
