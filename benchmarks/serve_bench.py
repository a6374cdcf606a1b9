"""Serving throughput and latency of `bentoml serve` against the raw model's own batched throughput.

Starts the embedded broker and the service on the real default model (the champion of ``--home``, or a
MiniLM fine-tuned briefly on ``--data`` in a temporary home), drives ``POST /predict`` with one text per
request at each concurrency, then repeats the load with Kafka logging turned off. The baseline, measured in
the same run, is the raw classifier (tokenize + forward) at its best batch size, in its own process with the
service workers' environment (passive OpenMP threads, no tokenizer thread pool). The top concurrency is measured
in interleaved rounds (raw, then both services) so background load on shared CPUs hits all three alike.

    python benchmarks/serve_bench.py --data ../shared/data/rotten_tomatoes.csv
    python benchmarks/serve_bench.py --quick          # smoke run: few requests, tiny training
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from flywheel.broker import EmbeddedBroker
from flywheel.classifier import Classifier
from flywheel.http import wait_until_ready
from flywheel.logs import configure_logging
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from service.service import WORKER_ENV
from service.serving import CPU_FORWARD_BATCH

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Server:
    """A running service: where it listens and its process (the group leader of its workers)."""

    host: str
    port: int
    pid: int


@dataclass
class LoadResult:
    """One load level against the service."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms_per_text(self) -> float:
        return self.cpu_seconds / self.requests * 1000

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_model(args: argparse.Namespace, home: Path) -> ModelVersion:
    """The champion of ``home``; trains one from the data first when there is none."""
    settings = Settings(home=home, torch_threads=args.threads)
    registry = ModelRegistry(settings)
    if registry.champion() is None:
        from retrain.data import load_dataset
        from retrain.pipeline import TrainingPipeline
        from retrain.trainer import Trainer

        raw = load_dataset(args.data).sample(n=args.train_rows, random_state=0)
        print(f"no champion in {home}: fine-tuning {settings.base_model} on {len(raw)} rows for 1 epoch")
        quick = settings.model_copy(update={"epochs": 1, "min_train_steps": 1})
        TrainingPipeline(quick, registry, Trainer(quick, progress=False)).run(raw)
    return registry.champion_version()


def _raw_worker(conn: Connection, model_dir: str, max_length: int, threads: int, texts: list[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    classifier = Classifier.load(model_dir, max_length=max_length)
    classifier.predict_proba(texts[:64], batch_size=64)
    while (request := conn.recv()) is not None:
        chunk, forward = request
        started = time.perf_counter()
        for start in range(0, len(texts), chunk):
            classifier.predict_proba(texts[start : start + chunk], batch_size=forward)
        conn.send(len(texts) / (time.perf_counter() - started))


class RawModel:
    """The bare classifier (tokenize + forward) in its own process, run with the service workers' environment."""

    def __init__(self, entry: ModelVersion, threads: int, texts: list[str]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        saved = dict(os.environ)
        os.environ.update({e["name"]: os.environ.get(e["name"], e["value"]) for e in WORKER_ENV})
        try:
            self._process = context.Process(
                target=_raw_worker, args=(child, str(entry.model_dir), entry.card.max_length, threads, texts)
            )
            self._process.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def rate(self, batch_size: int, forward: int | None = None) -> float:
        """Texts/s over the sample handed over ``batch_size`` at a time (run ``forward`` texts per pass)."""
        self._conn.send((batch_size, forward or batch_size))
        return float(self._conn.recv())

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(30)


@contextmanager
def service(
    home: Path, bootstrap: str, threads: int, log_predictions: bool, extra_env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`bentoml serve` as in production (one worker), until the block ends; ``extra_env`` adds FLYWHEEL_* options."""
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
        "FLYWHEEL_TORCH_THREADS": str(threads),
        "FLYWHEEL_LOG_PREDICTIONS": str(log_predictions).lower(),
        "BENTOML_HOME": str(home / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        **(extra_env or {}),
    }
    log = open(home / f"serve-{port}.log", "wb")  # noqa: SIM115 (closed in finally)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service.service:TextClassifier",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_ready(
            f"http://127.0.0.1:{port}", timeout=180, exited=process.poll, context=lambda: f"See {log.name}."
        )
        yield Server("127.0.0.1", port, process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


async def drive(host: str, port: int, texts: list[str], concurrency: int, requests: int) -> LoadResult:
    """Closed-loop load: ``concurrency`` keep-alive connections, one text per request."""
    bodies = [json.dumps({"text": text}).encode() for text in texts]
    latencies: list[float] = []
    errors = 0
    issued = 0

    async def client() -> None:
        nonlocal issued, errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while issued < requests:
                body = bodies[issued % len(bodies)]
                issued += 1
                head = (
                    f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                started = time.perf_counter()
                writer.write(head + body)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if b" 200 " not in status:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LoadResult(concurrency, requests, errors, time.perf_counter() - started, latencies)


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


def level(server: Server, texts: list[str], concurrency: int, requests: int) -> LoadResult:
    """One closed-loop run at ``concurrency``, with the CPU time the service spent on it."""
    before = cpu_seconds(server.pid)
    result = asyncio.run(drive(server.host, server.port, texts, concurrency, requests))
    result.cpu_seconds = cpu_seconds(server.pid) - before
    return result


def describe(name: str, result: LoadResult) -> str:
    return (
        f"{name:<22} c={result.concurrency:<3} {result.rate:7.1f} texts/s  p50 {result.percentile(50):7.1f} ms  "
        f"p99 {result.percentile(99):7.1f} ms  server CPU {result.cpu_ms_per_text:5.2f} ms/text  errors {result.errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "rotten_tomatoes.csv")
    parser.add_argument("--home", type=Path, default=None, help="Flywheel home whose champion to serve.")
    parser.add_argument("--requests", type=int, default=800, help="Requests per run at the top concurrency.")
    parser.add_argument("--concurrency", default="1,8,32", help="Comma-separated concurrency levels.")
    parser.add_argument("--rounds", type=int, default=6, help="Interleaved rounds at the top concurrency.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="Torch CPU threads.")
    parser.add_argument("--train-rows", type=int, default=800, help="Rows to fine-tune on when there is no model.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: few requests, one round, tiny training.")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.train_rows = 200, 1, 200
    configure_logging("WARNING")
    levels = [int(level) for level in args.concurrency.split(",")]
    top = levels[-1]

    import pandas as pd

    texts = pd.read_csv(args.data)["text"].astype(str).sample(frac=1.0, random_state=1).tolist()
    with tempfile.TemporaryDirectory() as scratch:
        home = (args.home or Path(scratch) / "home").resolve()
        entry = prepare_model(args, home)
        print(
            f"model {entry.version} ({entry.card.base_model}, max_length {entry.card.max_length}); "
            f"{args.threads} torch threads; {len(os.sched_getaffinity(0))} CPUs; load avg {os.getloadavg()[0]:.1f}"
        )
        raw = RawModel(entry, args.threads, texts[:512])
        sizes = {size: raw.rate(size) for size in (8, 16, 32, 64, 128)}
        best = max(sizes, key=lambda size: sizes[size])
        print("raw model, tokenize + forward: " + ", ".join(f"batch {b}: {r:.1f}/s" for b, r in sizes.items()))
        print(
            f"for reference, raw model batched like the service at c={top} ({top} texts sorted by length, forward "
            f"passes of {CPU_FORWARD_BATCH}): {raw.rate(top, CPU_FORWARD_BATCH):.1f}/s"
        )

        with (
            contextlib.closing(raw),
            EmbeddedBroker(port=free_port()) as broker,
            service(home, broker.bootstrap, args.threads, log_predictions=True) as logged,
            service(home, broker.bootstrap, args.threads, log_predictions=False) as unlogged,
        ):
            for address in (logged, unlogged):
                level(address, texts, top, top * 8)  # warm up
            for concurrency in levels[:-1]:
                count = max(50, args.requests // (8 if concurrency == 1 else 2))
                print(describe("service, logging on", level(logged, texts, concurrency, count)))
                print(describe("service, logging off", level(unlogged, texts, concurrency, count)))
            # The 2 CPUs may be shared: alternate the three measurements and compare within each round.
            raws, ons, offs = [], [], []
            for round_ in range(args.rounds):
                raws.append(raw.rate(best))
                # Alternate which service goes first, so a drifting background load favours neither.
                first, second = (logged, unlogged) if round_ % 2 == 0 else (unlogged, logged)
                results = {first: level(first, texts, top, args.requests)}
                results[second] = level(second, texts, top, args.requests)
                ons.append(results[logged])
                offs.append(results[unlogged])
                print(f"round: raw {raws[-1]:.1f}/s | " + describe("logging on", ons[-1]).strip())
                print(f"       raw {raws[-1]:.1f}/s | " + describe("logging off", offs[-1]).strip())

    def aggregate(results: list[LoadResult]) -> float:
        return sum(r.requests for r in results) / sum(r.seconds for r in results)

    # All rounds together: total texts over total time (paired per-round medians are shown for comparison).
    raw_all = len(raws) / sum(1 / rate for rate in raws)
    on_all, off_all = aggregate(ons), aggregate(offs)
    ratio, cost = on_all / raw_all, 1 - on_all / off_all
    ratio_median = float(np.median([on.rate / base for on, base in zip(ons, raws, strict=True)]))
    cost_median = float(np.median([1 - on.rate / off.rate for on, off in zip(ons, offs, strict=True)]))
    cpu_on = sum(r.cpu_seconds for r in ons) / sum(r.requests for r in ons) * 1000
    cpu_off = sum(r.cpu_seconds for r in offs) / sum(r.requests for r in offs) * 1000
    p50 = np.median([r.percentile(50) for r in ons])
    p99 = np.median([r.percentile(99) for r in ons])
    print()
    print(
        f"over {args.rounds} rounds at concurrency {top}: raw model {raw_all:.1f} texts/s (batch {best}); service "
        f"{on_all:.1f} texts/s with Kafka logging, {off_all:.1f} without; "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (medians, with logging)"
    )
    print(
        f"service / raw model: {ratio:.3f} (per-round median {ratio_median:.3f}); "
        f"target >= 0.80: {'met' if ratio >= 0.8 else 'NOT met'}"
    )
    print(
        f"cost of Kafka logging: {cost * 100:.1f}% of throughput (per-round median {cost_median * 100:.1f}%); "
        f"server CPU {cpu_on:.2f} vs {cpu_off:.2f} ms/text ({(cpu_on / cpu_off - 1) * 100:+.1f}%); "
        f"target <= 5%: {'met' if cost <= 0.05 else 'NOT met'}"
    )
    errors = sum(r.errors for r in ons + offs)
    if errors:
        print(f"{errors} requests failed")


if __name__ == "__main__":
    main()
