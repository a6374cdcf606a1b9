"""Geometry shared by the ops pages' charts, drawn server-side as inline SVG (no script, nothing fetched).

Every chart is one plot area of the same size with a score or share up the y axis; each page's module computes its
points with these helpers and its template only places the numbers it is given. The drift index (monitoring) and
the model page (retrain) both draw with it, and neither may import the other, so the shared part lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WIDTH, HEIGHT = 920, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 16, 40
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM


@dataclass(frozen=True)
class Tick:
    """A horizontal grid line of a chart at value ``label``."""

    y: float
    label: str


@dataclass(frozen=True)
class AxisLabel:
    """A label under the x axis."""

    x: float
    anchor: str
    text: str


def y_of(value: float, low: float = 0.0, high: float = 1.0) -> float:
    """Height of ``value`` in the plot area whose y axis runs from ``low`` (bottom) to ``high`` (top)."""
    return TOP + PLOT_H * (1 - (value - low) / (high - low))


def ticks(low: float = 0.0, high: float = 1.0, count: int = 5) -> list[Tick]:
    """``count`` evenly spaced grid lines from ``low`` to ``high``."""
    values = [low + (high - low) * i / (count - 1) for i in range(count)]
    return [Tick(y_of(value, low, high), f"{value:.4g}") for value in values]


@dataclass(frozen=True, kw_only=True)
class Frame:
    """The plot area every chart template draws first, in SVG user units, with its grid and x-axis labels."""

    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_w: int = PLOT_W
    plot_h: int = PLOT_H
    ticks: list[Tick] = field(default_factory=ticks)
    labels: list[AxisLabel] = field(default_factory=list)

    @property
    def middle_x(self) -> float:
        return self.left + self.plot_w / 2

    @property
    def middle_y(self) -> float:
        return self.top + self.plot_h / 2
