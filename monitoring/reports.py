"""Drift report summaries and the archive of their HTML and JSON files in the state directory."""

from __future__ import annotations

import html
import re
import shutil
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from flywheel.events import new_id, utcnow
from flywheel.storage import atomic_write_text
from monitoring.drift import Signal, Verdict
from monitoring.errors import MonitoringError
from monitoring.performance import PerformanceEstimate

HTML_FILE = "report.html"
SUMMARY_FILE = "summary.json"
_REPORT_ID = re.compile(r"[0-9a-f-]{36}")


class DriftSummary(BaseModel):
    """Everything one drift run found, as stored in ``summary.json`` and served by ``GET /drift/latest``."""

    report_id: str = Field(default_factory=new_id)
    created_at: datetime = Field(default_factory=utcnow)
    verdict: Verdict
    model_version: str
    window_start: datetime | None = None
    window_end: datetime | None = None
    window_rule: str
    current_rows: int
    served_rows: int = 0
    feedback_rows: int = 0
    reference_rows: int = 0
    min_rows: int
    drift_score: float | None = None
    min_signals: int
    fired: list[str] = Field(default_factory=list)
    signals: list[Signal] = Field(default_factory=list)
    performance: PerformanceEstimate | None = None
    targeted: list[str] = Field(default_factory=list)
    alert_event_id: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    duration_seconds: float = 0.0
    message: str = ""


class ReportArchive:
    """``<home>/monitoring/reports/<report_id>/`` holding ``report.html`` and ``summary.json``."""

    def __init__(self, home: Path) -> None:
        self.directory = home / "monitoring" / "reports"

    def path(self, report_id: str) -> Path:
        """A report's directory; the id is checked so it can never name another path."""
        if not _REPORT_ID.fullmatch(report_id):
            raise MonitoringError(f"malformed drift report id {report_id!r}")
        return self.directory / report_id

    def save(self, summary: DriftSummary, report_html: str) -> Path:
        """Write the HTML first and the summary last, so a summary always has its report."""
        directory = self.path(summary.report_id)
        atomic_write_text(directory / HTML_FILE, report_html)
        atomic_write_text(directory / SUMMARY_FILE, summary.model_dump_json(indent=2))
        return directory

    def summary(self, report_id: str) -> DriftSummary:
        """A stored summary, or an error naming the id."""
        path = self.path(report_id) / SUMMARY_FILE
        if not path.is_file():
            raise MonitoringError(f"no drift report {report_id}")
        return DriftSummary.model_validate_json(path.read_text())

    def html_path(self, report_id: str) -> Path:
        """The stored HTML report's file."""
        path = self.path(report_id) / HTML_FILE
        if not path.is_file():
            raise MonitoringError(f"no drift report {report_id}")
        return path

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` reports' files; returns the deleted ids."""
        doomed = self.ids()[:-keep] if keep > 0 else self.ids()
        for report_id in doomed:
            shutil.rmtree(self.path(report_id), ignore_errors=True)
        return doomed

    def ids(self) -> list[str]:
        """Ids of the stored complete reports, oldest first (ids are time-ordered UUIDv7)."""
        if not self.directory.is_dir():
            return []
        return sorted(
            p.name for p in self.directory.iterdir() if _REPORT_ID.fullmatch(p.name) and (p / SUMMARY_FILE).is_file()
        )


def summary_block(summary: DriftSummary) -> str:
    """An HTML block with the verdict, each signal and the performance estimate, for the top of a report."""
    colour = {"drifted": "#b3261e", "no_drift": "#1e7b34", "insufficient_data": "#7a5d00"}[summary.verdict]
    rows = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(s.name),
            html.escape(s.method),
            "-" if s.score is None else f"{s.score:.4f}",
            f"{s.threshold:g}",
            html.escape(s.skipped) if s.skipped else ("<b>drift</b>" if s.drifted else "ok"),
        )
        for s in summary.signals
    )
    perf = summary.performance
    perf_html = ""
    if perf is not None:
        estimated = (
            f"{perf.estimated_accuracy:.3f} (95% {perf.estimated_low:.3f}–{perf.estimated_high:.3f})"
            if perf.estimated_accuracy is not None
            else "n/a (no golden holdout to calibrate on)"
        )
        realised = (
            f"{perf.realised_accuracy:.3f} on {perf.realised_rows} accepted feedback labels"
            if perf.realised_accuracy is not None
            else "no accepted feedback in the window"
        )
        perf_html = (
            f"<p><b>Estimated accuracy</b> ({html.escape(perf.method)}): {estimated} over {perf.rows} predictions; "
            f"golden holdout accuracy {perf.holdout_accuracy if perf.holdout_accuracy is not None else 'n/a'}.<br>"
            f"<b>Realised accuracy</b>: {realised}. <i>{html.escape(perf.note)}</i></p>"
        )
    window = (
        f"{summary.window_start:%Y-%m-%d %H:%M} – {summary.window_end:%Y-%m-%d %H:%M} UTC"
        if summary.window_start and summary.window_end
        else "-"
    )
    return (
        '<section id="flywheel-summary" style="font-family:sans-serif;margin:16px;padding:12px;'
        f'border-left:6px solid {colour};background:#fafafa">'
        f'<h2 style="margin:0 0 8px">Drift report {html.escape(summary.report_id)}: '
        f'<span style="color:{colour}">{summary.verdict.replace("_", " ")}</span></h2>'
        f"<p>Model {html.escape(summary.model_version)}; window {window} ({html.escape(summary.window_rule)}); "
        f"{summary.current_rows} current rows vs {summary.reference_rows} reference rows; drift score "
        f"{'-' if summary.drift_score is None else f'{summary.drift_score:.3f}'} "
        f"(verdict drifted when ≥ {summary.min_signals} signal(s) fire). {html.escape(summary.message)}</p>"
        + (
            '<table border="1" cellpadding="4" style="border-collapse:collapse;font-size:13px">'
            "<tr><th>signal</th><th>method</th><th>score</th><th>threshold</th><th>result</th></tr>"
            f"{rows}</table>"
            if rows
            else ""
        )
        + perf_html
        + (
            f"<p>{len(summary.targeted)} requests most unlike the reference were moved to the front of the "
            "review queue (<code>GET /drift/targets</code>).</p>"
            if summary.targeted
            else ""
        )
        + "</section>"
    )


def with_summary(report_html: str, summary: DriftSummary) -> str:
    """Evidently's report HTML with the Flywheel summary block placed first in its body."""
    block = summary_block(summary)
    match = re.search(r"<body[^>]*>", report_html)
    if match is None:
        return block + report_html
    return report_html[: match.end()] + block + report_html[match.end() :]


def standalone_page(summary: DriftSummary) -> str:
    """A report page for runs without an Evidently report (too few rows)."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Drift report {html.escape(summary.report_id)}</title></head><body>"
        f"{summary_block(summary)}</body></html>"
    )
