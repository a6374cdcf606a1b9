"""The core's commands (registry, database schema, dev broker) and what every package's CLI shares."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.errors import FlywheelError
from flywheel.logs import configure_logging
from flywheel.settings import Settings

if TYPE_CHECKING:
    from flywheel.database import Database
    from flywheel.deployments import DeploymentStore

app = typer.Typer(no_args_is_help=True)
models_app = typer.Typer(help="Inspect the model registry and move the champion pointer.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema: apply migrations once before anything starts.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of named principals, each with a role.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
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
    """Make VERSION the champion; serving processes pick it up without a restart. A shadow or canary of VERSION
    ends as promoted."""
    from flywheel.registry import ModelRegistry

    change = ModelRegistry(load_settings()).promote(version, reason="manual promote")
    _audit_champion("model.promote", change.version, change.previous)
    typer.echo(f"champion: {change.previous or '-'} -> {change.version}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Restore the previous champion."""
    from flywheel.registry import ModelRegistry

    change = ModelRegistry(load_settings()).rollback()
    _audit_champion("model.rollback", change.version, change.previous)
    typer.echo(f"champion: {change.previous} -> {change.version}")


@models_app.command("shadow")
def models_shadow(
    version: str,
    sample: Annotated[float, typer.Option(help="Share of live requests the shadow also scores (0-1].")] = 0.2,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the shadow of VERSION instead.")] = False,
    reason: Annotated[str, typer.Option(help="Why it stops, for the record.")] = "stopped by hand",
    actor: Annotated[str, typer.Option("--as", help="Who does it, for the audit log.")] = "cli",
) -> None:
    """Deploy VERSION as a shadow: a sample of live requests is also scored by it and logged, never returned (a
    challenger deployed before ends as replaced); --stop ends it."""
    from flywheel.models.deployment import DeploymentCreate, DeploymentMode, DeploymentOutcome

    with _deployments() as store:
        if stop:
            store.end(version, DeploymentMode.SHADOW, DeploymentOutcome.STOPPED, actor=actor, reason=reason)
            typer.echo(f"shadow of {version} stopped; `flywheel models compare {version}` shows its figures")
            return
        started = store.start(DeploymentCreate(version=version, mode=DeploymentMode.SHADOW, share=sample), actor)
    typer.echo(
        f"shadow of {version} on {sample:.0%} of requests beside champion {started.champion_version}; every "
        f"service follows within FLYWHEEL_RELOAD_INTERVAL seconds; `flywheel models compare {version}` compares"
    )


@models_app.command("canary")
def models_canary(
    version: str,
    share: Annotated[float | None, typer.Option(help="Share of callers it answers (0-1].")] = None,
    withdraw: Annotated[bool, typer.Option("--withdraw", help="Withdraw the canary of VERSION instead.")] = False,
    reason: Annotated[str, typer.Option(help="Why it is withdrawn, for the record.")] = "withdrawn by hand",
    actor: Annotated[str, typer.Option("--as", help="Who does it, for the audit log.")] = "cli",
) -> None:
    """Deploy VERSION as a canary answering --share of callers (by client id, else principal: each caller always
    the same model); withdrawn automatically when worse on feedback; `models promote VERSION` finishes it."""
    from flywheel.models.deployment import DeploymentCreate, DeploymentMode, DeploymentOutcome

    with _deployments() as store:
        if withdraw:
            store.end(version, DeploymentMode.CANARY, DeploymentOutcome.WITHDRAWN, actor=actor, reason=reason)
            typer.echo(f"canary {version} withdrawn: the champion answers every caller again")
            return
        if share is None:
            raise FlywheelError(f"say how many callers it answers: flywheel models canary {version} --share 0.1")
        started = store.start(DeploymentCreate(version=version, mode=DeploymentMode.CANARY, share=share), actor)
    typer.echo(
        f"canary {version} answers {share:.0%} of callers beside champion {started.champion_version}; "
        f"`flywheel models compare {version}` compares, `flywheel models promote {version}` finishes it"
    )


@models_app.command("compare")
def models_compare(
    version: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """VERSION's latest shadow or canary against the served model: rows, agreement, confidence shift, label shares,
    both sides' accuracy on the feedback that arrived for those requests."""
    from flywheel.comparison import comparison

    with _database() as database:
        figures = comparison(database, version)
    if as_json:
        typer.echo(figures.model_dump_json(indent=2))
        return
    console.print(figures.render())


@models_app.command("challengers")
def models_challengers(limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20) -> None:
    """Shadow and canary deployments: version, share, who started it, and how and why it ended."""
    with _deployments() as store:
        deployments = store.history(limit)
    table = Table("started", "version", "mode", "share", "by", "champion", "ended", "outcome", "reason")
    for item in deployments:
        ended = f"{item.ended_at:%Y-%m-%d %H:%M} by {item.ended_by}" if item.ended_at else "active"
        table.add_row(
            f"{item.started_at:%Y-%m-%d %H:%M}", item.version, item.mode, f"{item.share:.0%}", item.started_by,
            item.champion_version or "-", ended, item.outcome or "", item.reason or "",
        )
    console.print(table)


@contextmanager
def _deployments() -> Iterator[DeploymentStore]:
    from flywheel.deployments import DeploymentStore
    from flywheel.registry import ModelRegistry

    with _database() as database:
        yield DeploymentStore(database, ModelRegistry(load_settings()))


def _audit_champion(action: str, version: str, previous: str | None) -> None:
    from flywheel.access import AuditLog
    from flywheel.database import DatabaseError
    from flywheel.deployments import DeploymentStore

    try:
        with _database() as database:
            AuditLog(database).record("cli", action, version, previous=previous)
            if action == "model.promote" and (ended := DeploymentStore(database).finish_promoted(version, "cli")):
                typer.echo(f"the {ended.mode} of {version} ended: promoted")
    except DatabaseError as exc:
        # The pointer moved already; say plainly that this change is missing from the audit log.
        typer.echo(f"warning: {action} {version} not written to the audit log: {exc}", err=True)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for: a person, a team or an application.")],
    role: Annotated[str, typer.Option(help="client, annotator, reviewer or admin.")] = "client",
    key_file: Annotated[
        Path | None, typer.Option(help="Adopt the key in this file (a deployment secret) instead of a random one.")
    ] = None,
    actor: Annotated[str, typer.Option("--as", help="Who is creating it, for the audit log.")] = "cli",
    if_missing: Annotated[bool, typer.Option(help="Do nothing when NAME exists (deployment init jobs).")] = False,
) -> None:
    """Create a principal and print its key, once, as the last line (only its hash is stored)."""
    from flywheel.access import KeyStore
    from flywheel.models.access import parse_role

    given = key_file.read_text().strip() if key_file is not None else None
    with _database() as database:
        store = KeyStore(database)
        if if_missing and any(existing.name == name for existing in store.list()):
            typer.echo(f"principal {name!r} exists already; nothing to do")
            return
        principal, key = store.create(name, parse_role(role), actor, key=given)
    typer.echo(f"created {principal.role} {principal.name!r}; from now on every protected route needs a key")
    if given is None:
        typer.echo("the key is shown only now; send it as the X-API-Key header:")
        typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """Every principal with its role and state (never a key)."""
    from flywheel.access import KeyStore

    with _database() as database:
        principals = KeyStore(database).list()
    table = Table("name", "role", "created", "by", "state")
    for principal in principals:
        state = f"revoked {principal.revoked_at:%Y-%m-%d %H:%M}" if principal.revoked_at else "active"
        created = f"{principal.created_at:%Y-%m-%d %H:%M}"
        table.add_row(principal.name, principal.role, created, principal.created_by, state)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    name: str,
    actor: Annotated[str, typer.Option("--as", help="Who is revoking it, for the audit log.")] = "cli",
) -> None:
    """Revoke a principal's key; services refuse it within seconds. Its labels and history stay."""
    from flywheel.access import KeyStore

    with _database() as database:
        principal = KeyStore(database).revoke(name, actor)
    typer.echo(f"revoked {principal.name!r}")


@app.command()
def audit(
    limit: Annotated[int, typer.Option(help="How many entries, newest first.")] = 50,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. key.create or source.trust.")] = None,
) -> None:
    """Who changed keys, trust, quarantine, promotions and labels, and when."""
    from flywheel.access import AuditLog

    with _database() as database:
        entries = AuditLog(database).recent(limit, action)
    table = Table("at", "actor", "action", "target", "detail")
    for entry in entries:
        detail = ", ".join(f"{k}={v}" for k, v in entry.detail.items())
        table.add_row(f"{entry.at:%Y-%m-%d %H:%M:%S}", entry.actor, entry.action, entry.target or "", detail)
    console.print(table)


@contextmanager
def _database() -> Iterator[Database]:
    from flywheel.database import Database

    database = Database.from_settings(load_settings()).start()
    try:
        yield database
    finally:
        database.dispose()


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

    # SIGINT too: a process started with SIGINT ignored (as a parent's child may be) would otherwise not stop on
    # Ctrl-C, since Python installs its KeyboardInterrupt handler only where SIGINT is not ignored at start.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _terminate)
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
