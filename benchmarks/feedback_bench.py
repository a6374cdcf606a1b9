"""Feedback-loop throughput: Kafka -> store ingestion (PostgreSQL and SQLite) and ``POST /feedback`` latency.

``POST /feedback`` is loaded on PostgreSQL closed-loop at saturation (``--concurrency`` clients back to back), then
open-loop at a fixed ``--rate`` (sent on schedule whatever the answers do, each latency counted from when it was
due, so a slow server cannot slow the load down and hide its delay), each with the rows per transaction the group
commit achieved. Baselines measured in the same run: a naive consumer that inserts and commits (rows and offsets)
one event at a time, and the raw Kafka read rate (decode only, no database) as the ceiling; for HTTP, ``GET /model``
on the same server at the same concurrency.

Targets: ingestion >= 5,000 events/s into PostgreSQL; open-loop ``POST /feedback`` p99 < 50 ms at 100 requests/s.

    python benchmarks/feedback_bench.py                 # 20,000 events; 3,000 requests at concurrency 16; 20 s at 100/s
    python benchmarks/feedback_bench.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata

from feedback.ingestion import PredictionIngestor
from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import PredictionEvent, Topic, decode, encode, utcnow
from flywheel.logs import configure_logging
from flywheel.models.feedback import Prediction
from flywheel.settings import Settings

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
INGEST_TARGET = 5_000
P99_TARGET_MS = 50.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def scratch_database(kind: str, admin_url: str, directory: Path) -> Iterator[str]:
    """A new empty database URL, dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    import psycopg

    name = f"flywheel_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_events(texts: list[str], count: int, seed: int = 0) -> list[PredictionEvent]:
    rng = random.Random(seed)
    events = []
    for i in range(count):
        positive = round(rng.betavariate(0.6, 0.6), 6)
        scores = {"negative": round(1 - positive, 6), "positive": positive}
        label = max(scores, key=lambda name: scores[name])
        events.append(
            PredictionEvent(
                prediction_id=str(uuid.uuid4()),
                model_version="bench",
                text=texts[i % len(texts)],
                label=label,
                confidence=scores[label],
                scores=scores,
                latency_ms=rng.uniform(2, 20),
            )
        )
    return events


def produce(bootstrap: str, events: list[PredictionEvent]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=262_144)
    for event in events:
        producer.send(Topic.PREDICTIONS.value, value=encode(event))
    producer.flush(60)
    producer.close()


def settings_for(home: Path, url: str, bootstrap: str) -> Settings:
    return Settings.model_validate(
        {"home": home, "database_url": url, "kafka_bootstrap": bootstrap, "ingest_max_poll_interval_ms": 3000}
    )


def ingest_rate(settings: Settings, expected: int) -> float:
    """Events/s of the batched ingestor, from partition assignment to the last row committed."""
    database = Database.from_settings(settings).upgrade()
    store = FeedbackStore(database, settings)
    ingestor = PredictionIngestor(settings, store, group_id=f"bench-{uuid.uuid4().hex[:8]}")
    thread = threading.Thread(target=ingestor.run, daemon=True)
    thread.start()
    ingestor.assigned.wait(60)
    started = time.perf_counter()
    while ingestor.stats.inserted + ingestor.stats.duplicates < expected:
        if not thread.is_alive():
            raise RuntimeError("ingestor died")
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    ingestor.stop()
    thread.join(30)
    database.dispose()
    return expected / elapsed


def naive_rate(settings: Settings, limit: int, with_database: bool) -> float:
    """Events/s of a one-at-a-time consumer: insert, commit, commit the offset (or only decode, without a database)."""
    database = Database.from_settings(settings).upgrade() if with_database else None
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=3000,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        # Small polls: one-at-a-time commits of a large poll would outlast max_poll_interval_ms.
        max_poll_records=20,
    )
    consumer.subscribe([Topic.PREDICTIONS.value])
    done, started = 0, 0.0
    while done < limit:
        for tp, messages in consumer.poll(timeout_ms=500).items():
            for message in messages:
                if not started:
                    started = time.perf_counter()
                event = decode(Topic.PREDICTIONS, message.value)
                row = prediction_row(event, utcnow())  # type: ignore[arg-type]
                if database is not None:
                    with database.session() as session:
                        session.merge(Prediction(**row))
                    consumer.commit({tp: OffsetAndMetadata(message.offset + 1, "", -1)})
                done += 1
                if done >= limit:
                    break
            if done >= limit:
                break
    elapsed = time.perf_counter() - started
    consumer.close(autocommit=False)
    if database is not None:
        database.dispose()
    return done / elapsed


async def _load(base: str, path: str, bodies: list[dict[str, str]] | None, count: int, concurrency: int) -> tuple[
    float, list[float], int
]:
    import httpx

    latencies: list[float] = []
    failures = 0
    pending = iter(range(count))  # shared: each worker takes the next request as it is free

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for i in pending:
            began = time.perf_counter()
            if bodies is None:
                response = await client.get(path)
            else:
                response = await client.post(path, json=bodies[i % len(bodies)])
            latencies.append((time.perf_counter() - began) * 1000)
            failures += response.status_code >= 400

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return count / elapsed, latencies, failures


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client for the open loop, whose sender must cost far less than the server it
    measures: httpx's pool slows down with hundreds of requests in flight, and its lag would count as the server's."""

    def __init__(self, base: str) -> None:
        host, _, port = base.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> int:
        """POST a JSON body; the answer's status, 0 when the connection failed."""
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (path.encode(), self.host.encode(), len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            lines = (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
            headers = {name.strip().lower(): value.strip() for name, _, value in lines}
            await reader.readexactly(int(headers.get(b"content-length", b"0")))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return 0
        # Kept for the next request unless the server closes it (it does after an unhandled error).
        if headers.get(b"connection", b"").lower() == b"close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return int(head.split(b" ", 2)[1])


async def _open_loop(
    base: str, bodies: list[dict[str, str]], rate: float, count: int
) -> tuple[list[float], list[float], int]:
    """Send ``count`` POSTs at ``rate`` per second on schedule; latencies from when each was due, how late each
    was sent (the load generator's own delay), and the failures."""
    latencies: list[float] = []
    lateness: list[float] = []
    failures = 0
    encoded = [json.dumps(body).encode() for body in bodies]
    client = RawHttp(base)

    async def one(body: bytes, due: float) -> None:
        nonlocal failures
        lateness.append((time.perf_counter() - due) * 1000)
        status = await client.post("/feedback", body)
        latencies.append((time.perf_counter() - due) * 1000)
        failures += not 200 <= status < 400

    started = time.perf_counter()
    tasks = []
    for i in range(count):
        due = started + i / rate
        if (delay := due - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(encoded[i % len(encoded)], due)))
    await asyncio.gather(*tasks)
    for _, writer in client.idle:
        writer.close()
    return latencies, lateness, failures


def commits(base: str) -> tuple[float, float]:
    """``POST /feedback`` transactions the server committed so far, and the rows they held."""
    from tests.processes import scrape

    metrics = f"{base}/metrics"
    return scrape(metrics, "flywheel_feedback_commit_rows_count"), scrape(metrics, "flywheel_feedback_commit_rows_sum")


def rows_per_transaction(before: tuple[float, float], after: tuple[float, float]) -> float:
    return (after[1] - before[1]) / max(1.0, after[0] - before[0])


def verdict(met: bool, figure: str) -> str:
    return f"met ({figure})" if met else f"NOT MET ({figure})"


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def http_benchmark(args: argparse.Namespace, texts: list[str], bootstrap: str, workdir: Path) -> list[str]:
    """Start the real service on PostgreSQL with a tiny champion, then load ``/feedback`` and ``/model``."""
    # The service fixture and the tiny model live with the tests; the repository root makes them importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flywheel.registry import ModelRegistry
    from retrain.pipeline import TrainingPipeline
    from retrain.trainer import Trainer
    from tests.conftest import TINY_TRAINING_ENV, running_service
    from tests.support import build_tiny_base, synthetic_sentiment

    lines = []
    with scratch_database("postgresql", args.postgres, workdir) as url:
        home = workdir / "service-home"
        env = {
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_BASE_MODEL": str(build_tiny_base(workdir / "tiny-base")),
            "FLYWHEEL_DATABASE_URL": url,
            "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
            "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0",
            **TINY_TRAINING_ENV,
            "FLYWHEEL_TORCH_THREADS": "1",
            "FLYWHEEL_SERVE_WORKERS": str(args.workers),
        }
        settings = Settings.model_validate({k.removeprefix("FLYWHEEL_").lower(): v for k, v in env.items()})
        TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False)).run(
            synthetic_sentiment(400)
        )
        database = Database(url).upgrade()
        events = make_events(texts, 2000, seed=1)
        FeedbackStore(database, settings).ingest([prediction_row(event, utcnow()) for event in events])
        database.dispose()
        rng = random.Random(2)
        bodies = [
            {"prediction_id": event.prediction_id, "label": rng.choice(["negative", "positive"]),
             "source": f"user-{rng.randrange(200)}"}
            for event in events
        ]
        with running_service(env) as base:
            asyncio.run(_load(base, "/feedback", bodies, 200, args.concurrency))  # warm-up
            before = commits(base)
            rate, latencies, failures = asyncio.run(_load(base, "/feedback", bodies, args.requests, args.concurrency))
            closed_rows = rows_per_transaction(before, commits(base))
            base_rate, base_latencies, _ = asyncio.run(_load(base, "/model", None, args.requests, args.concurrency))
            before = commits(base)
            open_count = round(args.rate * args.seconds)
            open_latencies, lateness, open_failures = asyncio.run(_open_loop(base, bodies, args.rate, open_count))
            open_rows = rows_per_transaction(before, commits(base))
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    b50, b99 = percentile(base_latencies, 50), percentile(base_latencies, 99)
    o50, o99 = percentile(open_latencies, 50), percentile(open_latencies, 99)
    lines.append(
        f"POST /feedback closed loop (PostgreSQL, {args.workers} worker), concurrency {args.concurrency}: {rate:,.0f} "
        f"req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, {failures} errors, {closed_rows:.1f} rows/transaction"
    )
    lines.append(
        f"GET /model baseline, same server:          {base_rate:,.0f} req/s, p50 {b50:.1f} ms, p99 {b99:.1f} ms "
        f"(/feedback p50 = {p50 / b50:.2f}x baseline)"
    )
    lines.append(
        f"POST /feedback open loop at {args.rate:g} req/s for {args.seconds:g} s ({open_count:,} requests): "
        f"p50 {o50:.1f} ms, p99 {o99:.1f} ms, {open_failures} errors, {open_rows:.1f} rows/transaction, "
        f"sender lag p99 {percentile(lateness, 99):.1f} ms; "
        f"p99 < {P99_TARGET_MS:g} ms: {verdict(o99 < P99_TARGET_MS, f'{o99:.1f} ms')}"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="Prediction events ingested per database.")
    parser.add_argument("--requests", type=int, default=3_000, help="POST /feedback requests.")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="Service worker processes.")
    parser.add_argument("--rate", type=float, default=100.0, help="Open-loop POST /feedback requests per second.")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of the open-loop run.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 2,000 events, 300 requests, 5 s open loop.")
    parser.add_argument("--skip-http", action="store_true", help="Only the ingestion part (no service).")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="Maintenance URL; a scratch DB is made on it.")
    args = parser.parse_args()
    if args.quick:
        args.events, args.requests = min(args.events, 2_000), min(args.requests, 300)
        args.seconds = min(args.seconds, 5.0)
    configure_logging("WARNING")
    texts = (
        pd.read_csv(args.data, dtype=str, keep_default_na=False)["text"].tolist()
        if args.data.is_file()
        else [f"synthetic review number {i} with some words" for i in range(5000)]
    )
    events = make_events(texts, args.events)
    naive_limit = max(200, args.events // 10)
    # The load average says how much else shared the CPUs: the latencies mean little on a busy machine.
    lines = [f"feedback benchmark on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
             f"({args.events:,} events, texts from {args.data.name if args.data.is_file() else 'a synthetic list'})"]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(port=free_port()) as broker:
        workdir = Path(tmp)
        produce(broker.bootstrap, events)
        ceiling = naive_rate(settings_for(workdir, "sqlite://", broker.bootstrap), args.events, with_database=False)
        lines.append(f"Kafka read + decode only (ceiling):       {ceiling:>10,.0f} events/s")
        for kind in ("postgresql", "sqlite"):
            with scratch_database(kind, args.postgres, workdir) as url:
                rate = ingest_rate(settings_for(workdir, url, broker.bootstrap), args.events)
            with scratch_database(kind, args.postgres, workdir) as url:
                naive = naive_rate(settings_for(workdir, url, broker.bootstrap), naive_limit, with_database=True)
            met = verdict(rate >= INGEST_TARGET, f"{rate:,.0f} events/s")
            target = f"  target >= {INGEST_TARGET:,}/s: {met}" if kind == "postgresql" else ""
            lines.append(f"ingest into {kind:<10} (batched):         {rate:>10,.0f} events/s{target}")
            lines.append(f"ingest into {kind:<10} (naive, 1 by 1):   {naive:>10,.0f} events/s "
                         f"-> batched is {rate / naive:.1f}x")
        if not args.skip_http:
            lines += http_benchmark(args, texts, broker.bootstrap, workdir)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
