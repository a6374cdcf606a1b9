"""The drift pages' HTML, from the Jinja2 templates in ``monitoring/templates``.

The index page lists every run with its verdict and draws the drift score over time as inline SVG (no script, no
CDN). The chart's geometry is computed here; the templates only place the numbers and strings they are given, and
autoescape escapes every value, so report ids, verdicts, signal names, model versions and messages cannot inject
markup.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from jinja2 import Environment, PackageLoader, StrictUndefined

from flywheel.models.drift import DriftReportPublic

VERDICT_COLOURS = {"drifted": "#b3261e", "no_drift": "#1e7b34", "insufficient_data": "#8a8a8a"}
WIDTH, HEIGHT = 920, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 16, 40


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@functools.cache
def templates() -> Environment:
    """The one template environment, built on first use so that importing this module reads no files.

    Autoescape is on for every template (all of them are HTML), and an undefined name is an error rather than an
    empty string, so a renamed field cannot silently blank part of a page.
    """
    env = Environment(
        loader=PackageLoader("monitoring"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["number"] = _number
    return env


def render(template: str, **context: object) -> str:
    """``template`` from ``monitoring/templates`` rendered with ``context``."""
    return templates().get_template(template).render(**context)


@dataclass(frozen=True)
class Tick:
    """A horizontal grid line of the chart at drift score ``label``."""

    y: float
    label: str


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


@dataclass(frozen=True)
class AxisLabel:
    """A time label under the x axis."""

    x: float
    anchor: str
    text: str


@dataclass(frozen=True)
class ScoreChart:
    """Everything ``drift_chart.html`` draws, in SVG user units."""

    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_w: int = WIDTH - LEFT - RIGHT
    plot_h: int = HEIGHT - TOP - BOTTOM
    ticks: list[Tick] = field(default_factory=list)
    line: str = ""
    dots: list[Dot] = field(default_factory=list)
    labels: list[AxisLabel] = field(default_factory=list)

    @property
    def middle_x(self) -> float:
        return self.left + self.plot_w / 2

    @property
    def middle_y(self) -> float:
        return self.top + self.plot_h / 2


def score_chart(reports: list[DriftReportPublic]) -> ScoreChart:
    """Drift score (share of signals that fired) per run, oldest left; runs without a verdict sit on the axis."""
    runs = sorted(reports, key=lambda r: r.created_at)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    ticks = [Tick(TOP + plot_h * (1 - tick), f"{tick:g}") for tick in (0.0, 0.25, 0.5, 0.75, 1.0)]
    if not runs:
        return ScoreChart(ticks=ticks)
    start = runs[0].created_at.timestamp()
    span = max(runs[-1].created_at.timestamp() - start, 1.0)

    def x_of(run: DriftReportPublic) -> float:
        if len(runs) == 1:
            return LEFT + plot_w / 2
        return LEFT + plot_w * (run.created_at.timestamp() - start) / span

    points = [f"{x_of(r):.1f},{TOP + plot_h * (1 - r.drift_score):.1f}" for r in runs if r.drift_score is not None]
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
                cy=TOP + plot_h * (1 - (run.drift_score or 0.0)),
                fill="#fff" if run.drift_score is None else colour,
                stroke=colour,
                tip=tip,
            )
        )
    ends = ((runs[0], "start"), (runs[-1], "end")) if len(runs) > 1 else ((runs[0], "middle"),)
    labels = [AxisLabel(x_of(run), anchor, f"{run.created_at:%Y-%m-%d %H:%M} UTC") for run, anchor in ends]
    return ScoreChart(ticks=ticks, line=" ".join(points) if len(points) > 1 else "", dots=dots, labels=labels)


def index_page(reports: list[DriftReportPublic], total: int) -> str:
    """The whole index page for the newest ``reports`` (``total`` runs exist)."""
    return render(
        "drift_index.html",
        reports=reports,
        total=total,
        latest=reports[0] if reports else None,
        chart=score_chart(reports),
        colours=VERDICT_COLOURS,
    )
