"""``flywheel serve``: the BentoML service in the foreground."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli import load_settings
from flywheel.errors import FlywheelError
from flywheel.settings import Settings

app = typer.Typer()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default FLYWHEEL_SERVE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FLYWHEEL_SERVE_PORT).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default FLYWHEEL_SERVE_WORKERS).")] = None,
) -> None:
    """Serve the champion model over HTTP with BentoML until Ctrl-C; promoted models load without a restart."""
    import os

    from flywheel.registry import ModelRegistry

    settings = load_settings()
    bind = host or settings.serve_host
    refuse_open_bind(settings, bind)
    if ModelRegistry(settings).champion() is None:
        typer.echo("warning: no champion model yet; /predict answers 503 until `flywheel train` promotes one", err=True)
    env = dict(os.environ)
    if workers is not None:
        env["FLYWHEEL_SERVE_WORKERS"] = str(workers)
    # Each server gets BentoML's state under the Flywheel home, not ~/bentoml, in a directory of its own: `bentoml
    # serve` wipes its Prometheus files at start and /metrics adds up every file there, so replicas sharing one home
    # must not share them. The model store is linked in from the home, as the Docker image does it.
    if "BENTOML_HOME" not in env:
        env["BENTOML_HOME"] = str(server_home(settings, bind, port or settings.serve_port))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    command = [
        sys.executable, "-m", "bentoml", "serve", "service.service:TextClassifier",
        # BentoML imports the service from the directory holding this package (the checkout or site-packages).
        "--working-dir", str(Path(__file__).resolve().parent.parent),
        "--host", bind,
        "--port", str(port or settings.serve_port),
    ]
    os.execve(sys.executable, command, env)


def server_home(settings: Settings, host: str, port: int) -> Path:
    """``<home>/bentoml/servers/<hostname>-<host>-<port>``: BentoML's home for one server (its Prometheus files), with
    ``models`` a link to the home's model store."""
    import socket

    home = settings.bentoml_home / "servers" / f"{socket.gethostname()}-{host}-{port}"
    home.mkdir(parents=True, exist_ok=True)
    (settings.bentoml_home / "models").mkdir(parents=True, exist_ok=True)
    link = home / "models"
    if not link.is_symlink():
        # Relative, so the link holds wherever the shared volume is mounted.
        link.symlink_to(Path("..") / ".." / "models", target_is_directory=True)
    return home


def refuse_open_bind(settings: Settings, host: str) -> None:
    """FlywheelError when ``host`` is reachable from other machines while no key exists (unless auth is off)."""
    import ipaddress

    from flywheel.access import KeyStore
    from flywheel.database import Database

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or not settings.auth or settings.api_keys:
        return
    database = Database.from_settings(settings).start()
    try:
        stored = KeyStore(database).active()
    finally:
        database.dispose()
    if not stored:
        raise FlywheelError(
            f"refusing to serve on {host} with no API keys: anyone could read and teach the model. Create one with "
            "`flywheel keys create NAME --role admin`, bind 127.0.0.1, or set FLYWHEEL_AUTH=off to accept the risk"
        )
