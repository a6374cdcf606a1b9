"""The drift pages' HTML, from the Jinja2 templates in ``monitoring/templates``.

The index page lists every run with its verdict and draws, as inline SVG (no script, no CDN), the drift score over
time and each predicted label's share of every hour's predictions. The charts' points are computed here, on the
plot area of ``flywheel.charts``; the templates only place the numbers and strings they are given, and autoescape
escapes every value, so report ids, verdicts, signal names, label names, model versions and messages cannot inject
markup.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flywheel.charts import LEFT, PLOT_W, AxisLabel, Frame, y_of
from flywheel.models.drift import DriftReportPublic
from flywheel.pages import templates
from monitoring.label_share import HourlyCount, LabelShareCheck

VERDICT_COLOURS = {"drifted": "#b3261e", "no_drift": "#1e7b34", "insufficient_data": "#8a8a8a"}
#: Line colours of the label-share chart (Tableau 10); past ten labels the dash patterns tell lines apart.
LABEL_COLOURS = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
LABEL_DASHES = ("", "6 3", "2 3", "9 3 2 3")


def render(template: str, **context: object) -> str:
    """``template`` from ``monitoring/templates`` rendered with ``context``."""
    return templates("monitoring").get_template(template).render(**context)


@dataclass(frozen=True)
class Dot:
    """One run on the chart, linking to its report; hollow when the run has no drift score."""

    report_id: str
    verdict: str
    cx: float
    cy: float
    fill: str
    stroke: str
    tip: str


@dataclass(frozen=True, kw_only=True)
class ScoreChart(Frame):
    """Everything ``drift_chart.html`` draws, in SVG user units."""

    line: str = ""
    dots: list[Dot] = field(default_factory=list)


def score_chart(reports: list[DriftReportPublic]) -> ScoreChart:
    """Drift score (share of signals that fired) per run, oldest left; runs without a verdict sit on the axis."""
    runs = sorted(reports, key=lambda r: r.created_at)
    if not runs:
        return ScoreChart()
    start = runs[0].created_at.timestamp()
    span = max(runs[-1].created_at.timestamp() - start, 1.0)

    def x_of(run: DriftReportPublic) -> float:
        if len(runs) == 1:
            return LEFT + PLOT_W / 2
        return LEFT + PLOT_W * (run.created_at.timestamp() - start) / span

    points = [f"{x_of(r):.1f},{y_of(r.drift_score):.1f}" for r in runs if r.drift_score is not None]
    dots = []
    for run in runs:
        colour = VERDICT_COLOURS.get(run.verdict, "#333")
        tip = (
            f"{run.created_at:%Y-%m-%d %H:%M} UTC — {run.verdict.replace('_', ' ')}"
            + (f", score {run.drift_score:.3f}" if run.drift_score is not None else "")
            + (f", fired: {', '.join(run.fired)}" if run.fired else "")
        )
        dots.append(
            Dot(
                report_id=run.report_id,
                verdict=run.verdict,
                cx=x_of(run),
                cy=y_of(run.drift_score or 0.0),
                fill="#fff" if run.drift_score is None else colour,
                stroke=colour,
                tip=tip,
            )
        )
    ends = ((runs[0], "start"), (runs[-1], "end")) if len(runs) > 1 else ((runs[0], "middle"),)
    labels = [AxisLabel(x_of(run), anchor, f"{run.created_at:%Y-%m-%d %H:%M} UTC") for run, anchor in ends]
    return ScoreChart(line=" ".join(points) if len(points) > 1 else "", dots=dots, labels=labels)


@dataclass(frozen=True)
class ShareDot:
    """One label's share of one hour's predictions."""

    cx: float
    cy: float
    tip: str


@dataclass(frozen=True)
class ShareLine:
    """One label on the label-share chart: its hours (a polyline per run of consecutive hours) and reference."""

    label: str
    colour: str
    dash: str
    segments: list[str]
    dots: list[ShareDot]
    #: The label's share of the newest report's reference, drawn as a dotted line, and its height.
    reference: float | None = None
    reference_y: float | None = None


@dataclass(frozen=True, kw_only=True)
class ShareChart(Frame):
    """Everything ``label_share_chart.html`` draws, in SVG user units, over the last ``hours`` hours."""

    hours: int
    predictions: int = 0
    lines: list[ShareLine] = field(default_factory=list)


def share_chart(
    counts: list[HourlyCount], end: datetime, hours: int, reference: LabelShareCheck | None = None
) -> ShareChart:
    """Each label's share of each hour's predictions over the ``hours`` hours up to ``end``, oldest left.

    Labels keep the reference's order (the model's), then the others by name, so a label keeps its colour.
    """
    last = end.replace(minute=0, second=0, microsecond=0)
    first = last - timedelta(hours=hours - 1)
    slots = max(hours - 1, 1)

    def x_of(hour: datetime) -> float:
        return LEFT + PLOT_W * ((hour - first).total_seconds() / 3600) / slots

    totals: dict[datetime, int] = defaultdict(int)
    by_label: dict[str, dict[datetime, int]] = defaultdict(dict)
    for row in counts:
        totals[row.hour] += row.count
        by_label[row.label][row.hour] = row.count
    known = [share.label for share in reference.shares] if reference is not None else []
    references = {share.label: share.reference_share for share in reference.shares} if reference is not None else {}
    order = [label for label in known if label in by_label] + sorted(set(by_label) - set(known))
    lines = []
    for i, label in enumerate(order):
        segments: list[list[str]] = []
        dots = []
        previous: datetime | None = None
        for hour in sorted(totals):
            share = by_label[label].get(hour, 0) / totals[hour]
            point = f"{x_of(hour):.1f},{y_of(share):.1f}"
            if previous is None or hour - previous > timedelta(hours=1):
                segments.append([])
            segments[-1].append(point)
            previous = hour
            dots.append(
                ShareDot(
                    cx=x_of(hour),
                    cy=y_of(share),
                    tip=f"{label} — {hour:%Y-%m-%d %H}:00 UTC: {share:.3f} "
                    f"({by_label[label].get(hour, 0)} of {totals[hour]} predictions)",
                )
            )
        ref = references.get(label)
        lines.append(
            ShareLine(
                label=label,
                colour=LABEL_COLOURS[i % len(LABEL_COLOURS)],
                dash=LABEL_DASHES[(i // len(LABEL_COLOURS)) % len(LABEL_DASHES)],
                segments=[" ".join(points) for points in segments if len(points) > 1],
                dots=dots,
                reference=ref,
                reference_y=None if ref is None else y_of(ref),
            )
        )
    labels = [
        AxisLabel(LEFT, "start", f"{first:%Y-%m-%d %H}:00 UTC"),
        AxisLabel(LEFT + PLOT_W, "end", f"{last:%Y-%m-%d %H}:00 UTC"),
    ]
    return ShareChart(hours=hours, predictions=sum(totals.values()), lines=lines, labels=labels)


def index_page(reports: list[DriftReportPublic], total: int, shares: ShareChart | None = None) -> str:
    """The whole index page for the newest ``reports`` (``total`` runs exist) and the hourly label ``shares``."""
    return render(
        "drift_index.html",
        reports=reports,
        total=total,
        latest=reports[0] if reports else None,
        chart=score_chart(reports),
        shares=shares,
        colours=VERDICT_COLOURS,
    )
