"""The drift index page: every run with its verdict, and the drift score over time as inline SVG (no CDN)."""

from __future__ import annotations

import html

from flywheel.models.drift import DriftReportPublic

VERDICT_COLOURS = {"drifted": "#b3261e", "no_drift": "#1e7b34", "insufficient_data": "#8a8a8a"}
WIDTH, HEIGHT = 920, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 16, 40


def score_chart(reports: list[DriftReportPublic]) -> str:
    """Drift score (share of signals that fired) per run, oldest left; runs without a verdict sit on the axis."""
    runs = sorted(reports, key=lambda r: r.created_at)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg id="drift-chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="drift score over time">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fcfcfc" stroke="#ccc"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = TOP + plot_h * (1 - tick)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:g}</text>')
    parts.append(
        f'<text x="14" y="{TOP + plot_h / 2:.0f}" font-size="11" transform="rotate(-90 14 {TOP + plot_h / 2:.0f})" '
        'text-anchor="middle">drift score</text>'
    )
    if not runs:
        parts.append(
            f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" fill="#777">no runs yet</text>'
        )
        return "".join(parts) + "</svg>"
    start = runs[0].created_at.timestamp()
    span = max(runs[-1].created_at.timestamp() - start, 1.0)

    def x_of(run: DriftReportPublic) -> float:
        if len(runs) == 1:
            return LEFT + plot_w / 2
        return LEFT + plot_w * (run.created_at.timestamp() - start) / span

    line = [f"{x_of(r):.1f},{TOP + plot_h * (1 - r.drift_score):.1f}" for r in runs if r.drift_score is not None]
    if len(line) > 1:
        parts.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#555" stroke-width="1.5"/>')
    for run in runs:
        score = run.drift_score if run.drift_score is not None else 0.0
        colour = VERDICT_COLOURS.get(run.verdict, "#333")
        hollow = run.drift_score is None
        tip = html.escape(
            f"{run.created_at:%Y-%m-%d %H:%M} UTC — {run.verdict.replace('_', ' ')}"
            + (f", score {run.drift_score:.3f}" if run.drift_score is not None else "")
            + (f", fired: {', '.join(run.fired)}" if run.fired else "")
        )
        parts.append(
            f'<a href="/drift/reports/{html.escape(run.report_id)}"><circle class="run {run.verdict}" '
            f'cx="{x_of(run):.1f}" cy="{TOP + plot_h * (1 - score):.1f}" r="5" '
            f'fill="{"#fff" if hollow else colour}" stroke="{colour}" stroke-width="2">'
            f"<title>{tip}</title></circle></a>"
        )
    for run, anchor in ((runs[0], "start"), (runs[-1], "end")) if len(runs) > 1 else ((runs[0], "middle"),):
        parts.append(
            f'<text x="{x_of(run):.1f}" y="{HEIGHT - 14}" font-size="11" text-anchor="{anchor}">'
            f"{run.created_at:%Y-%m-%d %H:%M} UTC</text>"
        )
    return "".join(parts) + "</svg>"


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def index_page(reports: list[DriftReportPublic], total: int) -> str:
    """The whole index page for the newest ``reports`` (``total`` runs exist)."""
    rows = "".join(
        "<tr>"
        f"<td>{r.created_at:%Y-%m-%d %H:%M:%S}</td>"
        f'<td><span class="verdict" style="background:{VERDICT_COLOURS.get(r.verdict, "#333")}">'
        f"{html.escape(r.verdict.replace('_', ' '))}</span></td>"
        f"<td>{_cell(r.drift_score)}</td>"
        f"<td>{html.escape(', '.join(r.fired)) or '-'}</td>"
        f"<td>{r.current_rows} / {r.reference_rows}</td>"
        f"<td>{html.escape(r.model_version)}</td>"
        f"<td>{_cell(r.estimated_accuracy)}</td>"
        f"<td>{_cell(r.realised_accuracy)}</td>"
        f"<td>{r.duration_seconds:.1f}s</td>"
        f'<td><a href="/drift/reports/{html.escape(r.report_id)}">report</a></td>'
        "</tr>"
        for r in reports
    )
    latest = reports[0] if reports else None
    headline = (
        f"Latest: <b>{html.escape(latest.verdict.replace('_', ' '))}</b> at {latest.created_at:%Y-%m-%d %H:%M} UTC "
        f"— {html.escape(latest.message)}"
        if latest
        else "No drift report yet: run <code>flywheel drift run</code> or <code>POST /drift/run</code>."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Flywheel drift reports</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin-top: 16px; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
.verdict {{ color: #fff; padding: 2px 6px; border-radius: 3px; white-space: nowrap; }}
.note {{ color: #555; font-size: 12px; max-width: 920px; }}
</style></head>
<body>
<h1>Drift reports</h1>
<p>{headline}</p>
{score_chart(reports)}
<p class="note">Drift score: share of the report's signals (text content, embeddings, text descriptors, predicted
labels and confidence, feedback labels) that fired. Estimated accuracy comes from the serving model's confidence
calibrated on the golden holdout; realised accuracy is measured on accepted feedback, which over-samples wrong
predictions. Showing the newest {len(reports)} of {total} runs. JSON: <a href="/drift/reports">/drift/reports</a>,
<a href="/drift/latest">/drift/latest</a>, <a href="/drift/targets">/drift/targets</a>.</p>
<table id="runs">
<tr><th>time (UTC)</th><th>verdict</th><th>drift score</th><th>signals fired</th><th>rows current / reference</th>
<th>model</th><th>est. accuracy</th><th>realised accuracy</th><th>took</th><th></th></tr>
{rows}
</table>
</body></html>
"""
