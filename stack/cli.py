"""The ``flywheel`` command line: the composition root that puts every package's commands behind one entry point."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from feedback.cli import app as feedback_commands
from flywheel.cli import app as core_commands
from flywheel.cli import load_settings
from flywheel.errors import FlywheelError
from monitoring.cli import app as drift_commands
from retrain.cli import app as training_commands
from service.cli import app as serving_commands

app = typer.Typer(help="Flywheel: serve a text classifier and improve it from feedback.", no_args_is_help=True)
for commands in (training_commands, core_commands, serving_commands, feedback_commands, drift_commands):
    app.add_typer(commands)


@app.command()
def worker() -> None:
    """The retrain worker: scheduled checks, queued and drift-triggered retrains, housekeeping; stops on SIGTERM."""
    from stack.worker import RetrainWorker

    RetrainWorker(load_settings()).run_forever()


@app.command()
def up(
    port: Annotated[int, typer.Option(help="HTTP port of the service (bound to 127.0.0.1).")] = 3000,
    broker_port: Annotated[
        int, typer.Option(help="Port of the embedded broker; unused when FLYWHEEL_KAFKA_BOOTSTRAP is set.")
    ] = 9092,
    data: Annotated[Path | None, typer.Option(help="Labeled file for the first model (default: the seed set).")] = None,
    train_minutes: Annotated[float, typer.Option(help="Wall-time cap of the first training run.")] = 5.0,
) -> None:
    """The whole loop on this machine: broker, first model, service, ingestion, worker; Ctrl-C stops it all."""
    from stack.up import LocalStack

    LocalStack(load_settings(), port=port, broker_port=broker_port, data=data, train_minutes=train_minutes).run()


def main() -> None:
    """Console-script entry: run the app, turning user-fixable errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except FlywheelError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:
        import click

        # Typer vendors its own click: its usage errors derive from typer.TyperException, not from click's classes.
        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        raise
