"""The drift commands: ``flywheel drift run`` and ``flywheel drift watch``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from flywheel.cli import load_settings
from flywheel.settings import Settings

if TYPE_CHECKING:
    from monitoring.monitor import DriftMonitor

app = typer.Typer()
drift_app = typer.Typer(help="Drift reports: recent traffic against the training data.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")


def _drift_monitor(settings: Settings, alert: bool) -> tuple[DriftMonitor, Callable[[], None]]:
    from flywheel.database import Database
    from flywheel.publisher import EventPublisher
    from monitoring.monitor import DriftMonitor

    database = Database.from_settings(settings).start()
    publisher = EventPublisher(settings, name="drift").start() if alert else None

    def close() -> None:
        if publisher is not None:
            publisher.close()
        database.dispose()

    return DriftMonitor(settings, database=database, publisher=publisher), close


@drift_app.command("run")
def drift_run(
    hours: Annotated[float | None, typer.Option(help="Window length (default FLYWHEEL_DRIFT_WINDOW_HOURS).")] = None,
    max_rows: Annotated[
        int | None, typer.Option(help="Newest predictions kept (default FLYWHEEL_DRIFT_WINDOW_MAX_ROWS).")
    ] = None,
    alert: Annotated[bool, typer.Option(help="Publish a drifted verdict on flywheel.alerts.")] = True,
) -> None:
    """Compare the recent predictions with the champion's training data; store the report and print the verdict."""
    settings = load_settings()
    overrides = {"drift_window_hours": hours, "drift_window_max_rows": max_rows}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    monitor, close = _drift_monitor(settings, alert)
    try:
        summary = monitor.run()
    finally:
        close()
    typer.echo(
        f"drift report {summary.report_id}: {summary.verdict} — {summary.message}; model {summary.model_version}, "
        f"{summary.current_rows} current vs {summary.reference_rows} reference rows, {summary.duration_seconds:.1f}s"
    )
    if summary.label_share is not None and summary.label_share.shares:
        shares = ", ".join(
            f"{s.label} {s.reference_share:.2f} → {s.current_share:.2f}" + (" (shifted)" if s.shifted else "")
            for s in summary.label_share.shares
        )
        typer.echo(f"label shares (reference → window): {shares}")
    typer.echo(f"report: {monitor.archive.path(summary.report_id) / 'report.html'}")


@drift_app.command("watch")
def drift_watch() -> None:
    """Run a drift report now and every FLYWHEEL_DRIFT_INTERVAL_SECONDS until Ctrl-C or SIGTERM."""
    from monitoring.schedule import watch

    settings = load_settings()
    if settings.drift_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.drift_metrics_port)
    monitor, close = _drift_monitor(settings, alert=True)
    try:
        watch(monitor, settings)
    finally:
        close()
