"""Real Flywheel processes for the tests that need several: start, scrape, read logs, and stop a whole tree.

BentoML runs each worker in its own process group, so stopping a server's group alone would leave a worker
serving; these helpers stop everything the process started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")

@contextlib.contextmanager
def flywheel_process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``flywheel ARGS`` (the console script) as the leader of a new session, output to ``log``; stopped with its
    whole process tree on exit (``stop_tree``). BENTOML_HOME is not inherited: each process finds the model store in
    ``env``'s FLYWHEEL_HOME by default, as an operator runs them."""
    inherited = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    full_env = {**inherited, "BENTOML_DO_NOT_TRACK": "true", **env}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [FLYWHEEL, *args], env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        stop_tree(process)


def process_tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The session leader ``process`` (until reaped), its descendants, and every process still in its session: BentoML
    puts each worker in a process group of its own, and a worker whose parent died is no longer anyone's child."""
    leader = process.pid
    found: dict[int, psutil.Process] = {}
    if process.returncode is None:  # once reaped, its pid may name another process
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(leader)
            found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for candidate in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            # Linux does not reuse a pid while it names a live session, so this finds only the leader's.
            if os.getsid(candidate.pid) == leader:
                found.setdefault(candidate.pid, candidate)
    return list(found.values())


def stop_tree(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the process (it stops its own workers, flushing their events), wait up to ``grace`` seconds, then
    SIGKILL whatever is left of its tree, so no orphan keeps serving or consuming after the test."""
    tree = process_tree(process)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    # Listed before the leader exited (its orphans lose it as parent) and again now (late-started children).
    tree += [p for p in process_tree(process) if p.pid not in {q.pid for q in tree}]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            if member.pid != os.getpid():
                member.kill()
    psutil.wait_procs(tree, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def scrape(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` (with ``labels``) on a Prometheus endpoint; 0 while it does not answer."""
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.TransportError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def tail(log: Path) -> str:
    """The end of a process's log, for a failure message."""
    return log.read_text(errors="replace")[-4000:]


def plain_url(url: str) -> str:
    """The SQLAlchemy URL as libpq takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://")


# 1. Several `flywheel ingest` processes in one consumer group over a partitioned topic.
