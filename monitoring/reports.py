"""Drift report summaries and the archive of their HTML and JSON files in the state directory."""

from __future__ import annotations

import re
import shutil
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from flywheel.events import new_id, utcnow
from flywheel.storage import atomic_write_text
from monitoring.dashboard import render
from monitoring.drift import Signal, Verdict
from monitoring.errors import MonitoringError
from monitoring.label_share import LabelShareCheck
from monitoring.performance import PerformanceEstimate
from monitoring.safe_page import SafePage, escaped, safe_page

HTML_FILE = "report.html"
#: The CSP sources of the report's own inline scripts, one a line (see ``monitoring.safe_page``).
SCRIPTS_FILE = "scripts.sha256"
SUMMARY_FILE = "summary.json"
SUMMARY_COLOURS: dict[Verdict, str] = {"drifted": "#b3261e", "no_drift": "#1e7b34", "insufficient_data": "#7a5d00"}
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
    #: Each predicted label's share of the window against the reference (None: the run had too few rows).
    label_share: LabelShareCheck | None = None
    #: Drift encoder of both sides' embeddings (``flywheel.encoder``), the same across model versions.
    drift_encoder: str = ""
    #: Window rows whose embedding was read from the store, and rows this report had to embed itself.
    embeddings_stored: int = 0
    embeddings_computed: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    duration_seconds: float = 0.0
    message: str = ""


class ReportArchive:
    """``<home>/monitoring/reports/<report_id>/`` holding ``report.html``, ``scripts.sha256`` and ``summary.json``."""

    def __init__(self, home: Path) -> None:
        self.directory = home / "monitoring" / "reports"

    def path(self, report_id: str) -> Path:
        """A report's directory; the id is checked so it can never name another path."""
        if not _REPORT_ID.fullmatch(report_id):
            raise MonitoringError(f"malformed drift report id {report_id!r}")
        return self.directory / report_id

    def save(self, summary: DriftSummary, report_html: str) -> Path:
        """Write the safe HTML and its scripts' hashes first, the summary last, so a summary always has its report."""
        directory = self.path(summary.report_id)
        page = safe_page(report_html)
        atomic_write_text(directory / HTML_FILE, page.html)
        atomic_write_text(directory / SCRIPTS_FILE, "".join(f"{source}\n" for source in page.script_hashes))
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

    def page(self, report_id: str) -> SafePage:
        """A stored report page, safe to serve, with the hashes of the scripts allowed to run in it.

        Reports stored before pages were made safe have no hashes file: they go through the same sanitizer on every
        read rather than being rewritten, so a GET never writes (nor races a prune), and they age out of the archive
        with ``FLYWHEEL_DRIFT_KEEP_REPORTS``.
        """
        path = self.html_path(report_id)
        scripts = path.with_name(SCRIPTS_FILE)
        if not scripts.is_file():
            return safe_page(path.read_text(encoding="utf-8"))
        return SafePage(path.read_text(encoding="utf-8"), tuple(scripts.read_text(encoding="ascii").split()))

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
    return render("drift_summary.html", summary=summary, colours=SUMMARY_COLOURS)


def with_summary(report_html: str, summary: DriftSummary) -> str:
    """Evidently's report HTML, its data escaped, with the Flywheel summary block placed first in its body.

    Escaping comes first so that the first ``<body`` is Evidently's own: a predicted text holding one would
    otherwise receive the block inside the report's data.
    """
    report_html = escaped(report_html)
    block = summary_block(summary)
    match = re.search(r"<body[^>]*>", report_html)
    if match is None:
        return block + report_html
    return report_html[: match.end()] + block + report_html[match.end() :]


def standalone_page(summary: DriftSummary) -> str:
    """A report page for runs without an Evidently report (too few rows)."""
    return render("drift_report.html", summary=summary, colours=SUMMARY_COLOURS)
