"""Scale-out as the README's "Scaling out" section describes it, on real processes: several `flywheel ingest`
consumers in one group over a partitioned topic (one SIGKILLed mid-stream), several `flywheel serve` replicas
sharing one home and one PostgreSQL database while a promotion rolls out, and several `flywheel worker` processes
behind the retrain lease.
"""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from kafka import KafkaProducer
from sqlmodel import select

from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import Topic, encode
from flywheel.http import wait_until_ready
from flywheel.models.retrain import RetrainRun, RetrainRunPublic, RunStatus, RunTrigger
from flywheel.registry import ModelRegistry
from retrain.runner import RetrainRunner
from tests.conftest import copy_home, free_port, run_cli, scratch_database_url, settings_from, wait_until
from tests.feedback.conftest import prediction
from tests.flywheel.model_files import register_copy
from tests.processes import flywheel_process, plain_url, scrape, stop_tree, tail
from tests.support import product_reviews

pytestmark = pytest.mark.slow
FINAL = {RunStatus.PROMOTED, RunStatus.REJECTED, RunStatus.SKIPPED, RunStatus.FAILED}

ASSIGNED = re.compile(r"partitions assigned: \[(.*)\]")
PARTITION = re.compile(r"flywheel\.predictions\[(\d+)\]")


def assignment(log: Path) -> set[int] | None:
    """The partitions of ``flywheel.predictions`` a consumer's log says it was given last (None: not yet)."""
    lines = ASSIGNED.findall(log.read_text(errors="replace"))
    return {int(p) for p in PARTITION.findall(lines[-1])} if lines else None


def owns_all_between_them(logs: list[Path], partitions: int) -> bool:
    """Whether these consumers' latest assignments split every partition between them, each holding some."""
    latest = [assignment(log) for log in logs]
    if any(not owned for owned in latest):
        return False
    owned = [p for found in latest for p in found or ()]
    return sorted(owned) == list(range(partitions))


class Producer(threading.Thread):
    """Publishes prediction events at a steady rate, as a service under traffic does, counting what it sent."""

    def __init__(self, bootstrap: str, total: int, per_tick: int = 40, tick: float = 0.1) -> None:
        super().__init__(name="producer", daemon=True)
        self.events = [prediction(f"review number {i} of the stream", (i % 10) / 10 + 0.05) for i in range(total)]
        self.sent = 0
        self.per_tick, self.tick = per_tick, tick
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for start in range(0, len(self.events), self.per_tick):
                for event in self.events[start:start + self.per_tick]:
                    # Keyed like a real producer: the hash spreads the events over all six partitions.
                    self.producer.send(Topic.PREDICTIONS.value, value=encode(event),
                                       key=event.prediction_id.encode())
                self.producer.flush(10)
                self.sent = min(start + self.per_tick, len(self.events))
                time.sleep(self.tick)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc
        finally:
            self.producer.close(5)


def test_three_ingest_consumers_one_killed_mid_stream_store_every_prediction_exactly_once(tmp_path: Path) -> None:
    partitions = 6
    # A private broker that creates Flywheel's topics with six partitions, before any consumer starts.
    with EmbeddedBroker(port=free_port(), partitions=partitions) as broker, \
            scratch_database_url("postgresql", tmp_path) as url:
        from kafka import KafkaConsumer

        probe = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        wait_until(lambda: probe.partitions_for_topic(Topic.PREDICTIONS.value) == set(range(partitions)),
                   timeout=20, what=f"{Topic.PREDICTIONS.value} with {partitions} partitions")
        probe.close()
        env = {
            "FLYWHEEL_HOME": str(tmp_path / "home"),
            "FLYWHEEL_DATABASE_URL": url,
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_INGEST_GROUP_ID": "scale-out",
            # Short group timings (session timeout 6 s, Kafka's floor): the group notices the kill within seconds.
            "FLYWHEEL_INGEST_MAX_POLL_INTERVAL_MS": "2000",
            "FLYWHEEL_INGEST_RETRY_MAX_SECONDS": "1",
            # Small batches: each consumer commits many times while the stream flows, so the kill lands between
            # a database commit and an offset commit as often as anywhere else.
            "FLYWHEEL_INGEST_BATCH_SIZE": "20",
        }
        ports = [free_port() for _ in range(3)]
        logs = [tmp_path / f"ingest-{i}.log" for i in range(3)]
        with contextlib.ExitStack() as stack:
            consumers = [
                stack.enter_context(flywheel_process(
                    ["ingest"], {**env, "FLYWHEEL_INGEST_METRICS_PORT": str(port)}, log))
                for port, log in zip(ports, logs, strict=True)
            ]
            wait_until(lambda: owns_all_between_them(logs, partitions), timeout=90,
                       what="three consumers sharing the six partitions")
            victim, survivors = 0, [1, 2]
            assert assignment(logs[victim]), "the victim owns partitions when it is killed"
            producer = Producer(broker.bootstrap, total=3000)
            producer.start()
            metrics = f"http://127.0.0.1:{ports[victim]}/metrics"
            # Killed once it has stored part of the stream, while events keep arriving on its partitions.
            wait_until(lambda: scrape(metrics, "flywheel_ingest_events_total", outcome="inserted") > 0,
                       timeout=30, what="the victim to store events")
            consumers[victim].send_signal(signal.SIGKILL)
            consumers[victim].wait(10)
            sent_at_kill = producer.sent
            producer.join(60)
            assert producer.error is None, producer.error
            assert sent_at_kill < producer.sent == 3000, "the stream went on after the kill"

            expected = {event.prediction_id for event in producer.events}
            with psycopg.connect(plain_url(url), autocommit=True) as db:
                def stored() -> int:
                    row = db.execute("SELECT count(*) FROM prediction").fetchone()
                    return int(row[0]) if row else 0

                wait_until(lambda: stored() >= len(expected), timeout=120, what="all 3000 predictions stored")
                time.sleep(2)  # anything re-delivered late would show up as an extra row now
                rows = db.execute("SELECT prediction_id, count(*) FROM prediction GROUP BY prediction_id").fetchall()
            assert {pid for pid, _ in rows} == expected, "none missing, none foreign"
            assert all(count == 1 for _, count in rows), "no prediction stored twice"
            # The survivors took over the dead consumer's partitions and are still running.
            assert owns_all_between_them([logs[i] for i in survivors], partitions)
            assert all(consumers[i].poll() is None for i in survivors)
            for i in survivors:
                stop_tree(consumers[i])
                assert consumers[i].returncode == 0, logs[i].read_text()[-3000:]
                assert "ingest stopped:" in logs[i].read_text()


# 2. Several `flywheel serve` replicas sharing one home (registry) and one PostgreSQL database.

RELOAD_INTERVAL = 1.0
#: Beyond the reload interval: the time a loaded 2-core machine takes to load the new model beside the old.
LOAD_ALLOWANCE = 15.0


class Traffic:
    """Client threads posting /predict to each replica in a loop, recording every answer."""

    def __init__(self, urls: dict[str, int]) -> None:
        #: (replica, started, status, model versions of the answer)
        self.records: list[tuple[str, float, int, set[str]]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(url, i), daemon=True)
            for url, threads in urls.items() for i in range(threads)
        ]

    def _loop(self, url: str, index: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post("/predict", json={"text": f"a lovely story, told {index} times"})
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0  # a dropped connection is a failed request too
                    response = None
                versions: set[str] = set()
                if status == 200 and response is not None:
                    data = response.json()
                    versions = {p["model_version"] for p in data["predictions"]} | {data["model_version"]}
                self.records.append((url, started, status, versions))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def serving_version(url: str) -> str | None:
    response = httpx.get(f"{url}/model", timeout=5)
    return response.json().get("version") if response.status_code == 200 else None


def test_two_serve_replicas_on_one_home_and_database_both_switch_on_promotion_without_a_failed_request(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    with scratch_database_url("postgresql", tmp_path) as database_url:
        env = {
            **copy_home(trained_home, tmp_path / "home"),
            "FLYWHEEL_DATABASE_URL": database_url,
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_RELOAD_INTERVAL": str(RELOAD_INTERVAL),
            "FLYWHEEL_SERVE_WORKERS": "1",
            "FLYWHEEL_TORCH_THREADS": "1",
        }
        registry = ModelRegistry(settings_from(env))
        first = registry.champion()
        second = register_copy(registry)
        ports = [free_port(), free_port()]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        logs = [tmp_path / f"serve-{port}.log" for port in ports]
        with contextlib.ExitStack() as stack:
            # `flywheel serve` as an operator runs it on each host, the one home shared. One after the other, as a
            # replica added or restarted beside running ones starts.
            servers = []
            for port, url, log in zip(ports, urls, logs, strict=True):
                server = stack.enter_context(flywheel_process(["serve", "--port", str(port)], env, log))
                wait_until_ready(url, timeout=180, exited=server.poll, context=functools.partial(tail, log))
                servers.append(server)
            assert [serving_version(url) for url in urls] == [first, first]
            answered_before = [scrape(f"{url}/metrics", "flywheel_predictions_total") for url in urls]

            # Unequal traffic, so each replica's own counters can be told apart.
            with Traffic({urls[0]: 2, urls[1]: 1}) as traffic:
                time.sleep(1.5)
                promoted_at = time.monotonic()
                promoted = run_cli(env, "models", "promote", second)
                assert promoted.returncode == 0 and f"champion: {first} -> {second}" in promoted.stdout, promoted
                switched: dict[str, float] = {}
                deadline = promoted_at + RELOAD_INTERVAL + LOAD_ALLOWANCE
                while len(switched) < len(urls):
                    for url in urls:
                        if url not in switched and serving_version(url) == second:
                            switched[url] = time.monotonic()
                    assert time.monotonic() < deadline, f"not every replica serves {second}: {switched}"
                    time.sleep(0.1)
                time.sleep(1.5)  # traffic on the new model, on both replicas
            time.sleep(0.5)
            answered_after = [scrape(f"{url}/metrics", "flywheel_predictions_total") for url in urls]
            assert all(server.poll() is None for server in servers)

    records = traffic.records
    assert records and {status for _, _, status, _ in records} == {200}, "not one request failed"
    for url in urls:
        mine = [(started, versions) for replica, started, _, versions in records if replica == url]
        assert all(versions == {first} for started, versions in mine if started < promoted_at)
        after = [versions for started, versions in mine if started > switched[url]]
        assert after and all(versions == {second} for versions in after), f"{url} answers with {second}"
    # Each replica's /metrics counts its own answers, not the other's: replicas do not share metric files.
    for url, counted_before, counted_after in zip(urls, answered_before, answered_after, strict=True):
        answered = sum(1 for replica, *_ in records if replica == url)
        assert counted_after - counted_before == answered, f"{url} counted {counted_after - counted_before}, " \
            f"answered {answered}"


# 3. Several `flywheel worker` processes behind the retrain lease.

def test_two_workers_run_one_retrain_at_a_time_and_promote_once(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    with EmbeddedBroker(port=free_port()) as broker, scratch_database_url("postgresql", tmp_path) as url:
        env = {
            **copy_home(trained_home, tmp_path / "home"),
            "FLYWHEEL_DATABASE_URL": url,
            # A private broker: no drift alert left by another test can queue a run here.
            "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLYWHEEL_RETRAIN_QUEUE_POLL_SECONDS": "0.5",
            # Only the queued runs below start retrains: no label count or schedule triggers one meanwhile.
            "FLYWHEEL_RETRAIN_MIN_NEW_LABELS": "100000",
            "FLYWHEEL_RETRAIN_INTERVAL_SECONDS": "86400",
            "FLYWHEEL_RETRAIN_LEASE_SECONDS": "20",
            "FLYWHEEL_RETRAIN_MIN_EVAL_ROWS": "8",
            "FLYWHEEL_EPOCHS": "6",
            # The tiny task's holdout has 40 rows: one miss is 2.5 points, so allow two.
            "FLYWHEEL_RETRAIN_MAX_HOLDOUT_DROP": "0.05",
        }
        settings = settings_from(env)
        database = Database(url).upgrade()
        registry = ModelRegistry(settings)
        store = FeedbackStore(database, settings)
        try:
            store.set_source("annotation", trusted=True)
            rows = product_reviews(80, seed=1)
            assert store.import_labels(zip(rows["text"], rows["label"], strict=True), source="annotation").created == 80
            runner = RetrainRunner(settings, database, registry, progress=False)
            champion = registry.champion()
            history_before = len(registry.pointer().history)
            logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
            with contextlib.ExitStack() as stack:
                # Started together, as `docker compose up --scale worker=2` starts them.
                workers = [stack.enter_context(flywheel_process(["worker"], env, log)) for log in logs]
                for worker, log in zip(workers, logs, strict=True):
                    def started(worker: subprocess.Popen[bytes] = worker, log: Path = log) -> bool:
                        return "retrain worker started" in log.read_text() or worker.poll() is not None

                    wait_until(started, timeout=120, what=f"{log.name} to start")
                    assert worker.poll() is None, f"a worker died starting:\n{log.read_text()[-3000:]}"

                first = runner.request(RunTrigger.API)  # what POST /retrain does
                wait_until(lambda: runner.get(first.run_id).status != RunStatus.QUEUED, timeout=30,
                           what="a worker to take the first run")
                # A second request while the first runs: the idle worker sees it and must not start it.
                second = runner.request(RunTrigger.API)
                assert second.run_id != first.run_id
                most_active = 0
                deadline = time.monotonic() + 500
                while True:
                    runs = {run.run_id: run for run in runner.runs()}
                    active = [run for run in runs.values() if run.status in (RunStatus.RUNNING, RunStatus.PROMOTING)]
                    most_active = max(most_active, len(active))
                    if runs[first.run_id].status not in FINAL:
                        assert runs[second.run_id].status == RunStatus.QUEUED, "the second run waits for the lease"
                    if all(runs[r].status in FINAL for r in (first.run_id, second.run_id)):
                        break
                    assert all(worker.poll() is None for worker in workers), "a worker died"
                    assert time.monotonic() < deadline, f"runs not finished: {runs}"
                    time.sleep(0.1)
                worker_logs = [log.read_text() for log in logs]
                for worker in workers:
                    stop_tree(worker, grace=30)
                    assert worker.returncode == 0, "a worker stops cleanly on SIGTERM"
            final_runs = runner.runs()
            with database.read_session() as session:
                ran_on = {row.run_id: row.worker for row in session.exec(select(RetrainRun))}
            pointer = registry.pointer()
            used = {f.feedback_id: f.used_by_version for f in store.export() if f.status == "used"}
        finally:
            database.dispose()

    assert most_active == 1, "exactly one retrain ran at any moment"
    a, b = (next(run for run in final_runs if run.run_id == r) for r in (first.run_id, second.run_id))
    assert [run.run_id for run in final_runs] == [b.run_id, a.run_id], "no run besides the two requested"
    assert a.status == RunStatus.PROMOTED, a
    assert b.started_at is not None and a.finished_at is not None and b.started_at >= a.finished_at
    pids = {str(worker.pid) for worker in workers}
    # worker identity is host:pid:suffix; each run was done by one of the two worker processes.
    assert {(ran_on[run.run_id] or "::").split(":")[1] for run in (a, b)} <= pids, ran_on
    # The worker that did not hold the lease saw a queued run and declined it instead of training beside it.
    assert any("another worker holds the retrain lock" in text for text in worker_logs)

    # One promotion per promoted run, each from the champion the run started from: none done twice.
    promoted_runs: list[RetrainRunPublic] = [run for run in (a, b) if run.status == RunStatus.PROMOTED]
    changes = pointer.history[history_before:]
    assert [(c.action, c.previous, c.version) for c in changes] == [
        ("promote", run.champion_version, run.challenger_version) for run in promoted_runs
    ]
    assert a.champion_version == champion
    assert b.champion_version == a.challenger_version, "the second run started from the first one's result"
    assert pointer.champion == promoted_runs[-1].challenger_version
    # Each label taught at most one model: the first run's are marked with its version and the second never saw them.
    for run in promoted_runs:
        assert sum(1 for version in used.values() if version == run.challenger_version) == run.feedback_train_rows
    assert len(used) == sum(run.feedback_train_rows or 0 for run in promoted_runs)
    assert (b.feedback_rows or 0) <= 80 - (a.feedback_train_rows or 0)
