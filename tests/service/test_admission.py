"""Admission control end to end through `bentoml serve`: overload is refused (503, Retry-After) with memory bounded,
one principal's flood does not refuse another's requests, a disconnected client's request is not computed, and
an Idempotency-Key retry is answered with the same predictions, logged once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.broker import EmbeddedBroker
from flywheel.events import PredictionEvent, Topic
from tests.conftest import copy_home, free_port, read_topic, running_service
from tests.service.conftest import FAST_ENV, metric

pytestmark = pytest.mark.slow

#: Long texts of real words: each is cut to 10 characters per token before tokenizing, so they cost as much to
#: classify as texts of the model's max length, and much more to send, parse and hold.
LONG = ("the movie was really quite good and the plot was lovely " * 40)[:2000]
FLOOD_KEY, OTHER_KEY = "flood-key-0123456789", "other-key-0123456789"


@dataclass
class Answers:
    """Statuses of a burst of requests, and the Retry-After values of its 503s."""

    statuses: list[int] = field(default_factory=list)
    retry_after: list[str] = field(default_factory=list)


async def _post(port: int, body: bytes, headers: dict[str, str], answers: Answers) -> None:
    """One request on its own connection, read back with asyncio streams (hundreds at once stay cheap)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        status = int((await reader.readline()).split()[1])
        found: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            found[name.strip().lower()] = value.strip()
        await reader.readexactly(int(found.get("content-length", "0")))
    finally:
        writer.close()
    answers.statuses.append(status)
    if status == 503:
        answers.retry_after.append(found.get("retry-after", ""))


async def _in_flight(http: httpx.AsyncClient) -> float:
    """Texts the service has admitted and not yet answered."""
    text = (await http.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "flywheel_admission_in_flight" and sample.labels.get("route") == "predict"
    )


def _url_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


def _server_pid(port: int) -> int:
    """The `bentoml serve` process listening on ``port`` (the root of the service's process tree)."""
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            process = psutil.Process(connection.pid)
            while process.parent() is not None and "bentoml" in " ".join(process.parent().cmdline()):
                process = process.parent()
            return process.pid
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this module's services: their thousands of predictions stay off the session's topic, which other
    tests' consumers read from the beginning."""
    with EmbeddedBroker(port=free_port()) as broker:
        yield broker


@pytest.fixture(scope="module")
def guarded(
    trained_home: dict[str, str], own_broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A service with two client keys, a small fixed text bound and a small body-byte bound."""
    env = {
        **copy_home(trained_home, tmp_path_factory.mktemp("guarded") / "home"),
        **FAST_ENV,
        "FLYWHEEL_KAFKA_BOOTSTRAP": own_broker.bootstrap,
        "FLYWHEEL_API_KEYS": f"{FLOOD_KEY},{OTHER_KEY}",
        "FLYWHEEL_ADMISSION_MAX_TEXTS": "256",
        "FLYWHEEL_ADMISSION_MAX_BODY_BYTES": str(8 * 2**20),
        "FLYWHEEL_SERVE_ACCESS_LOG": "false",
    }
    with running_service(env) as url:
        yield url


def test_overload_is_refused_with_503_and_memory_stays_bounded(guarded: str) -> None:
    port = _url_port(guarded)
    pid = _server_pid(port)
    body = json.dumps({"texts": [f"{LONG} {i}" for i in range(256)]}).encode()  # 0.5 MB, the most texts allowed
    headers = {"X-API-Key": FLOOD_KEY}
    assert httpx.post(f"{guarded}/predict", content=body, headers=headers, timeout=60).status_code == 200
    idle = _tree_rss(pid)
    peak = idle
    answers = Answers()

    async def burst() -> None:
        nonlocal peak
        # 300 concurrent requests offer 150 MB of bodies: held whole (bytes, parsed strings, events) they would
        # take several times the idle footprint.
        sending = asyncio.gather(*(_post(port, body, headers, answers) for _ in range(300)))
        while not sending.done():
            peak = max(peak, _tree_rss(pid))
            await asyncio.sleep(0.05)
        await sending

    asyncio.run(burst())
    assert set(answers.statuses) <= {200, 429, 503}, answers.statuses
    assert answers.statuses.count(200) >= 1 and answers.statuses.count(503) >= 1, answers.statuses
    assert all(value.isdigit() and int(value) >= 1 for value in answers.retry_after), answers.retry_after
    assert peak <= 1.5 * idle, f"peak RSS {peak / 2**20:.0f} MB vs idle {idle / 2**20:.0f} MB"
    assert metric(guarded, "flywheel_admission_refused_total", route="predict") >= answers.statuses.count(503)

    # The service answers normally at once afterwards.
    started = time.monotonic()
    after = httpx.post(f"{guarded}/predict", json={"text": "a great film"}, headers=headers, timeout=30)
    assert after.status_code == 200 and time.monotonic() - started < 5


def test_a_flooding_principal_is_refused_while_another_is_admitted(guarded: str) -> None:
    port = _url_port(guarded)
    flood_body = json.dumps({"texts": [f"{LONG} {i}" for i in range(64)]}).encode()
    flood, others = Answers(), []

    async def scenario() -> None:
        stop = asyncio.Event()

        async def flooder() -> None:
            while not stop.is_set():
                await _post(port, flood_body, {"X-API-Key": FLOOD_KEY}, flood)
                if flood.statuses[-1] == 503:
                    await asyncio.sleep(0.02)

        flooding = [asyncio.ensure_future(flooder()) for _ in range(60)]
        await asyncio.sleep(1.0)  # the flood holds the whole bound by now
        async with httpx.AsyncClient(base_url=guarded, headers={"X-API-Key": OTHER_KEY}, timeout=60) as http:
            for i in range(10):
                answer = await http.post("/predict", json={"texts": [f"{LONG} other {i}"] * 16})
                others.append(answer.status_code)
        stop.set()
        await asyncio.gather(*flooding)

    asyncio.run(scenario())
    assert flood.statuses.count(503) >= 10, f"the flood was not refused: {flood.statuses.count(503)} refusals"
    assert set(flood.statuses) <= {200, 503}
    assert others == [200] * 10, others


@pytest.fixture(scope="module")
def roomy(
    trained_home: dict[str, str], own_broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A service that admits everything, so only disconnects drop work, and nothing else uses it."""
    env = {
        **copy_home(trained_home, tmp_path_factory.mktemp("roomy") / "home"),
        **FAST_ENV,
        "FLYWHEEL_KAFKA_BOOTSTRAP": own_broker.bootstrap,
        "FLYWHEEL_ADMISSION_MAX_TEXTS": "1000000",
        "FLYWHEEL_SERVE_ACCESS_LOG": "false",
    }
    with running_service(env) as url:
        yield url


def test_a_disconnected_clients_request_is_not_computed(roomy: str, own_broker: EmbeddedBroker) -> None:
    port = _url_port(roomy)
    marker = f"left before its answer {uuid.uuid4().hex}"
    busy_body = json.dumps({"texts": [f"{LONG} {i}" for i in range(256)]}).encode()
    computed_before = metric(roomy, "flywheel_batch_size_sum")
    dropped_before = metric(roomy, "flywheel_dropped_jobs_total", route="predict", reason="cancelled")
    busy = Answers()

    async def scenario() -> None:
        # 32 requests of 256 texts queue seconds of inference ahead of the one that leaves.
        load = asyncio.gather(*(_post(port, busy_body, {}, busy) for _ in range(32)))
        async with httpx.AsyncClient(base_url=roomy, timeout=10) as http:
            while await _in_flight(http) < 16 * 256:
                await asyncio.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            body = json.dumps({"texts": [marker] * 3}).encode()
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            # Long enough for the service to read it and queue its job, far shorter than the work ahead of it.
            await asyncio.sleep(1.0)
        await load

    asyncio.run(scenario())
    assert busy.statuses == [200] * 32
    assert metric(roomy, "flywheel_dropped_jobs_total", route="predict", reason="cancelled") == dropped_before + 1
    # Exactly the busy texts were classified: not one of the three texts of the request that left.
    assert metric(roomy, "flywheel_batch_size_sum") - computed_before == 32 * 256
    events = read_topic(own_broker.bootstrap, Topic.PREDICTIONS, lambda _: False, timeout=3)
    assert len(events) >= 32 * 256, "the busy requests' predictions were logged"
    assert not [e for e in events if isinstance(e, PredictionEvent) and e.text == marker]


def test_an_idempotent_retry_gets_the_same_predictions_logged_once(service_url: str, broker: EmbeddedBroker) -> None:
    key = str(uuid.uuid4())
    body = {"texts": ["a lovely film", f"dull and far too long {key}"]}
    with httpx.Client(base_url=service_url, timeout=30) as http:
        first = http.post("/predict", json=body, headers={"Idempotency-Key": key})
        retry = http.post("/predict", json=body, headers={"Idempotency-Key": key})
        other = http.post("/predict", json={"text": "something else"}, headers={"Idempotency-Key": key})
        fresh = http.post("/predict", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        bad = http.post("/predict", json=body, headers={"Idempotency-Key": "x" * 300})
    assert first.status_code == retry.status_code == fresh.status_code == 200
    assert retry.json() == first.json() and retry.headers["idempotent-replayed"] == "true"
    ids = {p["prediction_id"] for p in first.json()["predictions"]}
    assert not ids & {p["prediction_id"] for p in fresh.json()["predictions"]}, "a new key is a new request"
    assert other.status_code == 422 and "different body" in other.json()["detail"]
    assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["detail"]

    def ours(events: list) -> list[PredictionEvent]:
        return [e for e in events if isinstance(e, PredictionEvent) and e.prediction_id in ids]

    read_topic(broker.bootstrap, Topic.PREDICTIONS, lambda events: len(ours(events)) >= 2, timeout=30)
    # Read on past the first two events, so a second copy of either would show up.
    events = ours(read_topic(broker.bootstrap, Topic.PREDICTIONS, lambda _: False, timeout=3))
    assert sorted(e.prediction_id for e in events) == sorted(ids), "each prediction logged exactly once"
