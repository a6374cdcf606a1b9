"""The core's commands (registry, database schema, dev broker) and what every package's CLI shares."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.errors import FlywheelError
from flywheel.logs import configure_logging
from flywheel.settings import Settings

app = typer.Typer(no_args_is_help=True)
models_app = typer.Typer(help="Inspect the model registry and move the champion pointer.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema: apply migrations once before anything starts.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
# Piped output is not cut to 80 columns: version ids and tables must stay whole for scripts.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def load_settings() -> Settings:
    """The settings from the environment, with logging configured as they say; every command starts here."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return settings


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration to FLYWHEEL_DATABASE_URL (run once before starting services; safe to repeat)."""
    from flywheel.database import Database

    database = Database.from_settings(load_settings()).upgrade()
    try:
        current, _ = database.schema_revisions()
    finally:
        database.dispose()
    typer.echo(f"database {database.display_url} is at schema {', '.join(sorted(current))}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this Flywheel needs; exit 1 when they differ."""
    from flywheel.database import Database

    database = Database.from_settings(load_settings())
    try:
        database.wait_until_ready()
        current, heads = database.schema_revisions()
    finally:
        database.dispose()
    typer.echo(f"database: {', '.join(sorted(current)) or 'empty'}; needed: {', '.join(sorted(heads))}")
    if current != heads:
        raise typer.Exit(1)


@models_app.command("list")
def models_list() -> None:
    """All registered versions, oldest first; the champion is marked."""
    from flywheel.registry import ModelRegistry

    registry = ModelRegistry(load_settings())
    champion = registry.champion()
    table = Table("version", "created", "parent", "holdout macro-F1", "train rows", "champion")
    for entry in registry.list():
        card = entry.card
        table.add_row(
            entry.version,
            card.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            card.parent_version or "-",
            f"{card.holdout_metrics['macro_f1']:.4f}",
            str(card.train_rows),
            "*" if entry.version == champion else "",
        )
    console.print(table)


@models_app.command("show")
def models_show(version: str) -> None:
    """The model card of one version, as JSON."""
    from flywheel.registry import ModelRegistry

    entry = ModelRegistry(load_settings()).get(version)
    typer.echo(entry.card.model_dump_json(indent=2))


@models_app.command("promote")
def models_promote(version: str) -> None:
    """Make VERSION the champion; serving processes pick it up without a restart."""
    from flywheel.registry import ModelRegistry

    change = ModelRegistry(load_settings()).promote(version, reason="manual promote")
    typer.echo(f"champion: {change.previous or '-'} -> {change.version}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Restore the previous champion."""
    from flywheel.registry import ModelRegistry

    change = ModelRegistry(load_settings()).rollback()
    typer.echo(f"champion: {change.previous} -> {change.version}")


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on (loopback only).")] = 9092,
) -> None:
    """Run the embedded Kafka-compatible broker (tansu) in the foreground until Ctrl-C. Dev only: in memory."""
    import signal
    import time

    from flywheel.broker import EmbeddedBroker

    load_settings()

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    embedded = EmbeddedBroker(port=port).start()
    typer.echo(
        f"tansu broker on {embedded.bootstrap} with topics created. DEV ONLY: storage is in memory and everything "
        f"is lost when it stops. Point services at it with FLYWHEEL_KAFKA_BOOTSTRAP={embedded.bootstrap}; "
        "set that variable to a real Kafka instead in production. Ctrl-C stops it."
    )
    try:
        while embedded.running():
            time.sleep(0.5)
        raise FlywheelError("the tansu broker exited unexpectedly")
    except KeyboardInterrupt:
        typer.echo("stopping broker")
    finally:
        embedded.stop()
