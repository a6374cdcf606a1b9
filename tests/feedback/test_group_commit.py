"""Group commit of ``POST /feedback`` through the real service (``bentoml serve``), on SQLite and PostgreSQL:
concurrent labels share transactions, each answered 202 only once stored; a row the database refuses fails alone;
and a SIGKILL right after a burst of 202 answers loses none of them. The queue itself, on a store: a refused label
fails alone, and a submission past its deadline is dropped unwritten."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlmodel import col, select

from feedback.decisions import FeedbackConflictError
from feedback.store import FeedbackStore
from feedback.submissions import SubmissionQueue
from flywheel.admission import DeadlineExceededError
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.labels import LabelLedger
from flywheel.models.feedback import Feedback, FeedbackCreate, FeedbackPublic
from tests.conftest import local_metric
from tests.feedback.conftest import Service, feedback_service, post_concurrently
from tests.processes import plain_url, scrape

pytestmark = pytest.mark.slow

CLIENTS = 16
#: Wide enough that concurrent requests of a loaded two-core machine still meet in one transaction.
COMMIT_MS = "20"
POISON = "poison-row"
ANSWERS_BEFORE_KILL = 300


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(
    request: pytest.FixtureRequest,
    trained_home: dict[str, str],
    broker: EmbeddedBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    directory = tmp_path_factory.mktemp(f"group-commit-{request.param}")
    with feedback_service(
        request.param, trained_home, broker.bootstrap, directory, FLYWHEEL_FEEDBACK_COMMIT_MS=COMMIT_MS
    ) as running:
        yield running


def bodies(count: int, what: str) -> list[dict[str, str]]:
    token = uuid.uuid4().hex[:8]
    return [{"text": f"{what} {token} number {i}", "label": "positive", "source": "load"} for i in range(count)]


def commits(service: Service) -> tuple[float, float]:
    """Transactions of ``POST /feedback`` committed so far, and the rows they held."""
    metrics = f"{service.base}/metrics"
    return scrape(metrics, "flywheel_feedback_commit_rows_count"), scrape(metrics, "flywheel_feedback_commit_rows_sum")


def test_concurrent_labels_share_transactions_and_each_is_stored_when_answered(service: Service) -> None:
    database = Database(service.database_url)
    unreadable: list[str] = []

    def read_back(response: httpx.Response) -> None:
        # Right after the answer, from this test's own connection: a 202 means committed, not merely queued.
        if response.status_code == 202:
            feedback_id = response.json()["feedback_id"]
            with database.read_session() as session:
                if session.get(Feedback, feedback_id) is None:
                    unreadable.append(feedback_id)

    transactions_before, rows_before = commits(service)
    try:
        answers = post_concurrently(service.base, bodies(96, "grouped label"), CLIENTS, read_back)
    finally:
        database.dispose()
    statuses = [getattr(answer, "status_code", answer) for answer in answers]
    assert statuses == [202] * len(answers), statuses
    assert not unreadable, f"{len(unreadable)} rows answered 202 were not readable right after: {unreadable[:3]}"
    ids = [answer.json()["feedback_id"] for answer in answers if isinstance(answer, httpx.Response)]
    assert service.stored(ids) == set(ids)

    transactions_after, rows_after = commits(service)
    transactions, rows = transactions_after - transactions_before, rows_after - rows_before
    assert rows == len(ids)
    assert 1 <= transactions < len(ids) / 2, f"{len(ids)} concurrent labels took {transactions:.0f} transactions"
    if service.database_url.startswith("postgresql"):
        # The database's own record: rows inserted by one transaction share its id (xmin).
        with psycopg.connect(plain_url(service.database_url)) as connection:
            distinct = connection.execute(
                "SELECT count(DISTINCT xmin::text) FROM feedback WHERE feedback_id = ANY(%s)", (ids,)
            ).fetchone()
        assert distinct is not None and distinct[0] < len(ids) / 2, distinct


def _poison_the_feedback_table(url: str) -> None:
    """A trigger that makes the database refuse one row (comment ``POISON``) and no other."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            connection.execute(
                f"CREATE TRIGGER IF NOT EXISTS poison BEFORE INSERT ON feedback WHEN NEW.comment = '{POISON}' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
            )
        return
    with psycopg.connect(plain_url(url), autocommit=True) as connection:
        connection.execute(
            f"""CREATE OR REPLACE FUNCTION poison() RETURNS trigger AS $$ BEGIN
                IF NEW.comment = '{POISON}' THEN RAISE EXCEPTION 'poisoned row'; END IF; RETURN NEW;
            END $$ LANGUAGE plpgsql"""
        )
        connection.execute("DROP TRIGGER IF EXISTS poison ON feedback")
        connection.execute("CREATE TRIGGER poison BEFORE INSERT ON feedback FOR EACH ROW EXECUTE FUNCTION poison()")


def test_a_row_the_database_refuses_fails_alone_and_the_rest_of_its_transaction_is_stored(service: Service) -> None:
    _poison_the_feedback_table(service.database_url)
    for _ in range(5):
        # The bad row in the middle of a burst, so concurrent labels share its transaction.
        burst = bodies(48, "beside a bad row")
        burst[CLIENTS + 4] = {**burst[CLIENTS + 4], "comment": POISON}
        answers = post_concurrently(service.base, burst, CLIENTS)
        statuses = [getattr(answer, "status_code", answer) for answer in answers]
        assert statuses[CLIENTS + 4] == 500, statuses
        others = [answer for i, answer in enumerate(answers) if i != CLIENTS + 4]
        assert [getattr(answer, "status_code", answer) for answer in others] == [202] * len(others), statuses
        ids = [answer.json()["feedback_id"] for answer in others if isinstance(answer, httpx.Response)]
        assert service.stored(ids) == set(ids)
        if "one transaction failed" in service.log.read_text(errors="replace"):
            break
    else:
        pytest.fail("the bad row never shared a transaction with others in 5 bursts")
    assert "poisoned row" in service.log.read_text(errors="replace")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_every_label_answered_202_before_a_sigkill_is_stored(
    kind: str, trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    answered: list[str] = []
    failed: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def client(number: int, base: str, kill: Callable[[], None]) -> None:
        with httpx.Client(base_url=base, timeout=10) as http:
            sent = 0
            while not killed.is_set():
                sent += 1
                body = {"text": f"client {number} label {sent} {uuid.uuid4().hex[:6]}", "label": "negative"}
                try:
                    response = http.post("/feedback", json=body)
                except httpx.HTTPError:
                    return  # the service is gone
                if response.status_code != 202:
                    failed.append(response.text)
                    return
                with lock:
                    answered.append(response.json()["feedback_id"])
                    if len(answered) >= ANSWERS_BEFORE_KILL and not killed.is_set():
                        # Right after an answer: were 202 sent before its transaction committed, the kill would
                        # land inside that transaction, with the other clients' requests still queued behind it.
                        kill()
                        killed.set()

    with feedback_service(kind, trained_home, broker.bootstrap, tmp_path, FLYWHEEL_FEEDBACK_COMMIT_MS=COMMIT_MS) as (
        service
    ):
        kill = service.killer()
        clients = [threading.Thread(target=client, args=(n, service.base, kill), daemon=True) for n in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(120)
        assert not any(thread.is_alive() for thread in clients), "the service still answers after its SIGKILL"
        assert not failed, failed[:3]
        assert killed.is_set()
        accepted = list(answered)
        missing = set(accepted) - service.stored(accepted)
    assert not missing, f"{len(missing)} of {len(accepted)} labels answered 202 are not stored: {sorted(missing)[:3]}"


def test_a_refused_label_fails_alone_and_its_transaction_goes_on(store: FeedbackStore) -> None:
    trained = store.submit(FeedbackCreate(text="a label a model learned", label="positive"), "annotator")
    store.set_source("annotator", trusted=True)
    assert LabelLedger(store.database).mark_used([trained.feedback_id], "v1") == 1
    queue = SubmissionQueue(store, commit_ms=50)
    creates = [FeedbackCreate(text=f"a new label {i}", label="negative") for i in range(6)]
    creates.insert(3, FeedbackCreate(text="a label a model learned", label="negative"))

    async def submit_all() -> list[FeedbackPublic | BaseException]:
        return await asyncio.gather(*(queue.submit(c, "annotator") for c in creates), return_exceptions=True)

    transactions = local_metric("flywheel_feedback_commit_rows_count")
    rows = local_metric("flywheel_feedback_commit_rows_sum")
    outcomes = asyncio.run(submit_all())
    # Queued in one go: at most the first is written before the others join, the refused one among them.
    assert local_metric("flywheel_feedback_commit_rows_count") - transactions <= 2
    assert local_metric("flywheel_feedback_commit_rows_sum") - rows == 6
    refused = outcomes.pop(3)
    assert isinstance(refused, FeedbackConflictError) and "was used to train model v1" in str(refused)
    saved = [outcome for outcome in outcomes if isinstance(outcome, FeedbackPublic)]
    assert [row.text for row in saved] == [f"a new label {i}" for i in range(6)], outcomes
    assert all(store.get(row.feedback_id).label == "negative" for row in saved)
    assert store.get(trained.feedback_id).label == "positive"


def test_a_submission_past_its_deadline_is_dropped_unwritten(store: FeedbackStore) -> None:
    drops: list[str] = []
    queue = SubmissionQueue(store, commit_ms=5, on_drop=drops.append)

    async def late_then_prompt() -> FeedbackPublic:
        with pytest.raises(DeadlineExceededError, match="FLYWHEEL_SERVE_TIMEOUT"):
            await queue.submit(FeedbackCreate(text="too late", label="positive"), "late", time.monotonic() - 1)
        return await queue.submit(FeedbackCreate(text="in time", label="positive"), "prompt")

    prompt = asyncio.run(late_then_prompt())
    assert drops == ["expired"]
    assert store.get(prompt.feedback_id).text == "in time"
    with store.database.read_session() as session:
        assert not list(session.exec(select(Feedback).where(col(Feedback.source) == "late")))
