"""Serving throughput and latency of Flywheel against the raw model in each runtime and against two peers.

Starts the embedded broker, Flywheel's `bentoml serve` (the runtime its model card chose, with and without Kafka
logging, and forced to ONNX Runtime int8), a naive FastAPI + ``transformers.pipeline`` peer and a plain BentoML
``batchable`` peer, all on the real default model (the champion of ``--home``, or MiniLM fine-tuned with the
default training on ``--data``), and drives ``POST /predict`` with one text per request at each concurrency. The
raw baselines run in their own process, in the default environment: every text sorted by length once, the best
forward batch, ``torch.inference_mode`` (PyTorch fp32, ONNX Runtime fp32 and int8), and the served runtime batched
as the service batches (arrival order, gathered ``c`` at a time, sorted inside). The top concurrency runs in
interleaved rounds, in a rotating order, so background load on shared CPUs hits every server alike.

Then the logging service runs the same rounds with a shadow challenger (a second version holding the champion's
files, so its pass costs what the champion's does) scoring every request, then one in five: the latency and
throughput a shadow costs. A shadow is state of the home's database, seen by every server of the home, so those
rounds cannot interleave with the others.

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
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
from servers import REPO, Server, cpu_seconds, free_port, peer, prepare_model, service
from shadows import shadow_deployed, shadow_version, wait_shadowing

from flywheel.broker import EmbeddedBroker
from flywheel.logs import configure_logging
from flywheel.registry import ModelVersion
from flywheel.runtime import load_classifier
from flywheel.settings import Settings
from service.serving import CPU_FORWARD_BATCH

#: Shares of requests the shadow rounds score.
SHADOW_SAMPLES = (1.0, 0.2)


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
        """Texts answered 200 per second."""
        return (self.requests - self.errors) / self.seconds

    @property
    def cpu_ms_per_text(self) -> float:
        return self.cpu_seconds / self.requests * 1000

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def _raw_worker(conn: Connection, entry: ModelVersion, threads: int, texts: list[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    classifiers = {
        runtime: load_classifier(entry, Settings(home=entry.path, runtime=runtime))
        for runtime in ("torch", "onnx", "onnx-int8")
    }
    for classifier in classifiers.values():
        classifier.predict_proba(texts[:64], batch_size=64)
    ordered = sorted(texts, key=len)
    while (request := conn.recv()) is not None:
        runtime, chunk, forward = request
        classifier = classifiers[runtime]
        started = time.perf_counter()
        if chunk is None:
            # The strongest plain use: every text sorted by length once, then forward passes of ``forward``.
            for start in range(0, len(ordered), forward):
                classifier.predict_proba(ordered[start : start + forward], batch_size=forward)
        else:
            # As the service batches: ``chunk`` texts in arrival order, sorted inside, passes of ``forward``.
            for start in range(0, len(texts), chunk):
                classifier.predict_proba(texts[start : start + chunk], batch_size=forward)
        conn.send(len(texts) / (time.perf_counter() - started))


class RawModel:
    """The bare classifier (tokenize + forward, ``torch.inference_mode``) in its own process, default environment,
    in each runtime: PyTorch fp32, ONNX Runtime fp32 and int8."""

    def __init__(self, entry: ModelVersion, threads: int, texts: list[str]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_raw_worker, args=(child, entry, threads, texts))
        self._process.start()

    def rate(self, runtime: str, forward: int, chunk: int | None = None) -> float:
        """Texts/s of ``runtime`` over the sample: sorted once in passes of ``forward``, or handed over ``chunk``
        at a time as the service does."""
        self._conn.send((runtime, chunk, forward))
        return float(self._conn.recv())

    def limit(self, runtime: str) -> tuple[float, int]:
        """The best texts/s of ``runtime`` over forward batch sizes, and that size."""
        rates = {size: self.rate(runtime, size) for size in (8, 16, 32, 64, 128)}
        best = max(rates, key=lambda size: rates[size])
        return rates[best], best

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(30)


async def drive(
    host: str, port: int, texts: list[str], concurrency: int, requests: int, *, batched_body: bool = False
) -> LoadResult:
    """Closed-loop load: ``concurrency`` keep-alive connections, one text per request."""
    bodies = [json.dumps({"texts": [text]} if batched_body else {"text": text}).encode() for text in texts]
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


def level(server: Server, texts: list[str], concurrency: int, requests: int) -> LoadResult:
    """One closed-loop run at ``concurrency``, with the CPU time the service spent on it."""
    before = cpu_seconds(server.pid)
    load = drive(server.host, server.port, texts, concurrency, requests, batched_body=server.batched_body)
    result = asyncio.run(load)
    result.cpu_seconds = cpu_seconds(server.pid) - before
    return result


def describe(name: str, result: LoadResult) -> str:
    return (
        f"{name:<34} c={result.concurrency:<3} {result.rate:7.1f} texts/s  p50 {result.percentile(50):7.1f} ms  "
        f"p99 {result.percentile(99):7.1f} ms  server CPU {result.cpu_ms_per_text:5.2f} ms/text  errors {result.errors}"
    )


def batch_totals(server: Server) -> tuple[float, float]:
    """Texts and batches the service's inference has run so far, from its own metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(httpx.get(f"http://{server.host}:{server.port}/metrics").text)
        for sample in family.samples
        if sample.name in ("flywheel_batch_size_sum", "flywheel_batch_size_count")
    }
    return values.get("flywheel_batch_size_sum", 0.0), values.get("flywheel_batch_size_count", 0.0)


def aggregate(results: list[LoadResult]) -> float:
    """Texts/s answered 200 over several runs: total texts over total time."""
    return sum(r.requests - r.errors for r in results) / sum(r.seconds for r in results)


def harmonic(rates: list[float]) -> float:
    """Texts/s over several raw runs of the same sample."""
    return len(rates) / sum(1 / rate for rate in rates)


def check(what: str, ok: bool, figure: str) -> str:
    return f"{what}: {'met' if ok else 'NOT MET'} ({figure})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "rotten_tomatoes.csv")
    parser.add_argument("--home", type=Path, default=None, help="Flywheel home whose champion to serve.")
    parser.add_argument("--requests", type=int, default=800, help="Requests per run at the top concurrency.")
    parser.add_argument("--concurrency", default="1,8,32", help="Comma-separated concurrency levels.")
    parser.add_argument("--rounds", type=int, default=4, help="Interleaved rounds at the top concurrency.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads per server.")
    parser.add_argument("--train-rows", type=int, default=2000, help="Rows to fine-tune on when there is no model.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: few requests, one round, tiny training.")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds, args.train_rows = 100, 1, 200
    configure_logging("WARNING")
    levels = [int(level) for level in args.concurrency.split(",")]
    top = levels[-1]

    import pandas as pd

    texts = pd.read_csv(args.data)["text"].astype(str).sample(frac=1.0, random_state=1).tolist()
    with tempfile.TemporaryDirectory() as scratch:
        home = (args.home or Path(scratch) / "home").resolve()
        entry = prepare_model(args, home)
        served = entry.card.runtime
        print(
            f"model {entry.version} ({entry.card.base_model}, max_length {entry.card.max_length}), served in "
            f"{served}; {args.threads} threads; {len(os.sched_getaffinity(0))} CPUs; load avg {os.getloadavg()[0]:.1f}"
        )
        for variant in entry.card.runtime_evidence.get("variants", []):
            print(
                f"  runtime {variant['runtime']:<9} macro-F1 {variant.get('macro_f1') or 0:.4f}  agreement "
                f"{variant.get('agreement') or 1:.4f}  {variant.get('texts_per_second') or 0:.0f} texts/s  "
                f"{variant['reason']}"
            )
        raw = RawModel(entry, args.threads, texts[:512])
        limits = {runtime: raw.limit(runtime) for runtime in ("torch", "onnx", "onnx-int8")}
        print("raw model, all texts sorted by length once, best batch: " + ", ".join(
            f"{runtime} {rate:.1f}/s (batch {size})" for runtime, (rate, size) in limits.items()
        ))
        results: dict[str, dict[int, list[LoadResult]]] = {}
        with (
            contextlib.closing(raw),
            EmbeddedBroker(port=free_port()) as broker,
            service(home, broker.bootstrap, args.threads, log_predictions=True) as logged,
            service(home, broker.bootstrap, args.threads, log_predictions=False) as unlogged,
            peer("naive", entry, args.threads, home) as naive,
            peer("bento", entry, args.threads, home) as bento,
            contextlib.ExitStack() as extra,
        ):
            servers = {
                f"Flywheel ({served}), logging on": logged,
                f"Flywheel ({served}), logging off": unlogged,
                "naive FastAPI + pipeline": naive,
                "plain BentoML batchable": bento,
            }
            if served != "onnx-int8":
                # The int8 runtime's figures even when the card chose another (its agreement check refused it).
                servers["Flywheel (onnx-int8), logging on"] = extra.enter_context(
                    service(home, broker.bootstrap, args.threads, log_predictions=True,
                            extra_env={"FLYWHEEL_RUNTIME": "onnx-int8"})
                )
            for server in servers.values():
                level(server, texts, top, top * 4)  # warm up
            for concurrency in levels[:-1]:
                count = max(50, args.requests // (8 if concurrency == 1 else 2))
                for name, server in servers.items():
                    result = level(server, texts, concurrency, count)
                    results.setdefault(name, {}).setdefault(concurrency, []).append(result)
                    print(describe(name, result))
            # The CPUs may be shared: alternate every measurement within each round, in a rotating order.
            raw_rounds: dict[str, list[float]] = {"served": [], "torch": []}
            order = list(servers)
            texts_before, batches_before = batch_totals(logged)
            for round_ in range(args.rounds):
                raw_rounds["torch"].append(raw.rate("torch", limits["torch"][1]))
                for name in order[round_ % len(order):] + order[: round_ % len(order)]:
                    result = level(servers[name], texts, top, args.requests)
                    results.setdefault(name, {}).setdefault(top, []).append(result)
                    print(f"round {round_ + 1}: " + describe(name, result))
            texts_after, batches_after = batch_totals(logged)
            # The raw runtime handed the texts in batches of the size the service gathered at the top concurrency.
            batch = (texts_after - texts_before) / max(1.0, batches_after - batches_before)
            chunk = max(1, round(batch))
            raw_as_served = harmonic([raw.rate(served, min(chunk, CPU_FORWARD_BATCH), chunk=chunk) for _ in range(3)])
            shadowed: dict[float, list[LoadResult]] = {}
            shadow = shadow_version(entry, home)
            for sample in SHADOW_SAMPLES:
                with shadow_deployed(home, shadow, sample) as deployment_id:
                    wait_shadowing(logged, broker.bootstrap, deployment_id)
                    # Warm up as every server was: the admission bound follows throughput, which the shadow changes.
                    level(logged, texts, top, top * 20)
                    name = f"Flywheel ({served}), shadow at {sample:.0%}"
                    for round_ in range(args.rounds):
                        result = level(logged, texts, top, args.requests)
                        shadowed.setdefault(sample, []).append(result)
                        print(f"round {round_ + 1}: " + describe(name, result))

    print()
    print(f"| server | c={' | c='.join(map(str, levels))} texts/s | p50 ms at c={top} | p99 ms at c={top} | "
          f"p99/p50 | server CPU ms/text |")
    print("|---" * (len(levels) + 5) + "|")
    for name, by_level in results.items():
        rates = " | ".join(f"{aggregate(by_level[c]):.1f}" for c in levels)
        tops = by_level[top]
        p50 = float(np.median([r.percentile(50) for r in tops]))
        p99 = float(np.median([r.percentile(99) for r in tops]))
        cpu = sum(r.cpu_seconds for r in tops) / sum(r.requests for r in tops) * 1000
        print(f"| {name} | {rates} | {p50:.1f} | {p99:.1f} | {p99 / p50:.2f} | {cpu:.2f} |")
    for runtime, (rate, size) in limits.items():
        print(f"| raw {runtime}, sorted once, batch {size} | | | {rate:.1f} | | | | {2000 / rate:.2f} |")
    print(f"| raw {served}, batched as the service batched ({chunk} per batch) | | | "
          f"{raw_as_served:.1f} | | | | {2000 / raw_as_served:.2f} |")
    print(f"service's mean inference batch at c={top}: {batch:.1f} texts")
    print()

    def served_rate(name: str, concurrency: int = top) -> float:
        return aggregate(results[name][concurrency])

    def p50_of(name: str, concurrency: int) -> float:
        return float(np.median([r.percentile(50) for r in results[name][concurrency]]))

    on, off = f"Flywheel ({served}), logging on", f"Flywheel ({served}), logging off"
    int8_name, naive_name = "Flywheel (onnx-int8), logging on", "naive FastAPI + pipeline"
    if served == "onnx-int8":
        int8_name = on
    torch_limit = harmonic(raw_rounds["torch"])
    tops = results[on][top]
    p50, p99 = float(np.median([r.percentile(50) for r in tops])), float(np.median([r.percentile(99) for r in tops]))
    mine, int8_rate, naive_rate = served_rate(on), served_rate(int8_name), served_rate(naive_name)
    cost = 1 - mine / served_rate(off)
    print(check(f"service ({served}) >= 90% of its raw runtime batched as it batches", mine >= 0.9 * raw_as_served,
                f"{mine / raw_as_served:.3f}: {mine:.1f} vs {raw_as_served:.1f} texts/s"))
    print(f"service ({served}) / raw {served} limit: {mine / limits[served][0]:.3f}; "
          f"/ plain PyTorch fp32 limit (same rounds): {mine / torch_limit:.3f}")
    print(check("int8 service >= 2x the plain-PyTorch fp32 limit (stretch 2.5x)", int8_rate >= 2 * torch_limit,
                f"{int8_rate / torch_limit:.2f}x: {int8_rate:.1f} vs {torch_limit:.1f} texts/s"))
    print(check("int8 service >= 8x the naive FastAPI peer", int8_rate >= 8 * naive_rate,
                f"{int8_rate / naive_rate:.2f}x"))
    print(check(f"p99 <= 1.5x p50 at c={top}", p99 <= 1.5 * p50, f"{p99:.1f} vs {p50:.1f} ms"))
    if 1 in levels:
        print(check("c=1 p50 <= the naive peer's", p50_of(on, 1) <= p50_of(naive_name, 1),
                    f"{p50_of(on, 1):.1f} vs {p50_of(naive_name, 1):.1f} ms"))
    print(check("Kafka logging costs <= 3% of throughput", cost <= 0.03, f"{cost * 100:.1f}%"))
    for sample, runs in shadowed.items():
        rate = aggregate(runs)
        shadow_p50 = float(np.median([r.percentile(50) for r in runs]))
        shadow_p99 = float(np.median([r.percentile(99) for r in runs]))
        print(
            f"with a shadow at sample {sample:g} (c={top}, after the rounds above): {rate:.1f} texts/s "
            f"({rate / mine - 1:+.1%} vs logging on), p50 {shadow_p50:.1f} ms ({shadow_p50 / p50 - 1:+.1%}), "
            f"p99 {shadow_p99:.1f} ms ({shadow_p99 / p99 - 1:+.1%})"
        )
    errors = sum(r.errors for by_level in results.values() for runs in by_level.values() for r in runs)
    if errors:
        print(f"{errors} requests failed")


if __name__ == "__main__":
    main()
