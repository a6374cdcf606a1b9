"""The servers the serving benchmarks start: Flywheel's `bentoml serve`, its peers, and the model they serve.

Each runs as its own process group on a free port and is stopped (SIGTERM, then SIGKILL) when its block ends;
``prepare_model`` trains the champion a benchmark serves when its home has none.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flywheel.database import Database
from flywheel.http import wait_until_ready
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Server:
    """A running service: where it listens and its process (the group leader of its workers)."""

    host: str
    port: int
    pid: int
    #: How a body carries its one text: ``{"text": t}``, or ``{"texts": [t]}`` for a batchable BentoML API.
    batched_body: bool = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_model(args: argparse.Namespace, home: Path) -> ModelVersion:
    """The champion of ``home``, its database migrated; trains one from the data first when there is none (with
    the default training; one epoch with ``--quick``)."""
    settings = Settings(home=home, torch_threads=args.threads)
    registry = ModelRegistry(settings)
    if registry.champion() is None:
        from retrain.data import load_dataset
        from retrain.pipeline import TrainingPipeline
        from retrain.trainer import Trainer

        raw = load_dataset(args.data).sample(n=args.train_rows, random_state=0)
        quick = getattr(args, "quick", False)
        print(f"no champion in {home}: fine-tuning {settings.base_model} on {len(raw)} rows" + (" for 1 epoch" * quick))
        if quick:
            settings = settings.model_copy(update={"epochs": 1, "min_train_steps": 1})
        TrainingPipeline(settings, registry, Trainer(settings, progress=False)).run(raw)
    # The service is ready only once its database is at the current schema, as `flywheel up` makes it.
    Database(settings.resolved_database_url).upgrade().dispose()
    return registry.champion_version()


@contextmanager
def process_server(
    command: list[str],
    env: dict[str, str],
    log_path: Path,
    *,
    ready_path: str = "/readyz",
    cwd: Path = REPO,
    batched_body: bool = False,
) -> Iterator[Server]:
    """A server process listening on ``env["PORT"]`` until the block ends, its output in ``log_path``."""
    port = int(env["PORT"])
    log = open(log_path, "wb")  # noqa: SIM115 (closed in finally)
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_until_ready(
            f"http://127.0.0.1:{port}", timeout=180, path=ready_path, exited=process.poll,
            context=lambda: f"See {log.name}.",
        )
        yield Server("127.0.0.1", port, process.pid, batched_body=batched_body)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def peer(kind: str, entry: ModelVersion, threads: int, home: Path) -> contextlib.AbstractContextManager[Server]:
    """The naive FastAPI + ``transformers.pipeline`` peer, or the plain BentoML batchable one, on ``entry``."""
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "FLYWHEEL_PEER_MODEL": str(entry.model_dir),
        "FLYWHEEL_PEER_MAX_LENGTH": str(entry.card.max_length),
        "OMP_NUM_THREADS": str(threads),
        "BENTOML_HOME": str(home / "bentoml-peer"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    peers = REPO / "benchmarks" / "peers"
    if kind == "naive":
        command = [sys.executable, "-m", "uvicorn", "naive:app", "--app-dir", str(peers), "--port", str(port),
                   "--log-level", "warning", "--no-access-log"]
        return process_server(command, env, home / f"naive-{port}.log", ready_path="/docs")
    command = [sys.executable, "-m", "bentoml", "serve", "bento:PlainClassifier", "--working-dir", str(peers),
               "--host", "127.0.0.1", "--port", str(port)]
    return process_server(command, env, home / f"bento-{port}.log", batched_body=True)


def service(
    home: Path, bootstrap: str, threads: int, log_predictions: bool, extra_env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[Server]:
    """`bentoml serve` as in production (one worker), until the block ends; ``extra_env`` adds FLYWHEEL_* options."""
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
        "FLYWHEEL_TORCH_THREADS": str(threads),
        "FLYWHEEL_LOG_PREDICTIONS": str(log_predictions).lower(),
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", "bentoml", "serve", "service.service:TextClassifier", "--host", "127.0.0.1",
               "--port", str(port)]
    return process_server(command, env, home / f"serve-{port}.log")


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process and all its descendants (the service's workers and their threads)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


