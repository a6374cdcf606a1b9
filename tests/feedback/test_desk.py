"""The annotation desk: leases that give an item to one annotator at a time (on SQLite and PostgreSQL, under
concurrency), labels stored as the annotator's feedback, undo, agreement; then the pages in headless chromium
against ``bentoml serve``: labelling with the keyboard, two annotators, a reviewer deciding a held label, hostile
texts, and forms without their CSRF token."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import delete
from sqlmodel import col, select

from feedback.desk_view import Desk, label_buttons
from feedback.leases import Leases, LeaseTakenError
from feedback.prediction_rows import prediction_row
from feedback.review import ReviewQueue
from feedback.store import FeedbackStore
from feedback.worklog import Worklog
from flywheel.access import AuditLog
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import FeedbackEvent, Topic, utcnow
from flywheel.models.desk import DeskEntry, DeskLease
from flywheel.models.drift import DriftTarget
from flywheel.models.feedback import Feedback, FeedbackSource, FeedbackStatus, Prediction
from tests.conftest import copy_home, read_topic, run_cli, running_service, settings_from
from tests.feedback.conftest import prediction

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

#: Marks the page's root element if it ever runs.
HOSTILE_TEXTS = [
    "</blockquote><script>document.documentElement.dataset.pwned1=1</script>",
    "<img src=x onerror=document.documentElement.dataset.pwned2=2> arrived broken",
]
HOSTILE_COMMENT = "<svg onload=document.documentElement.dataset.pwned3=3>"
PWNED = "() => Object.keys(document.documentElement.dataset)"


def ingest(store: FeedbackStore, items: list[tuple[str, float]], drift: dict[int, float] | None = None) -> list[str]:
    """Store predictions of ``(text, P(positive))``, the ones in ``drift`` (index: score) as drift targets; returns
    their ids in order."""
    now = utcnow()
    events = [prediction(text, positive, at=now - timedelta(seconds=i)) for i, (text, positive) in enumerate(items)]
    store.ingest([prediction_row(event, now) for event in events])
    with store.database.session() as session:
        for index, score in (drift or {}).items():
            session.add(
                DriftTarget(
                    prediction_id=events[index].prediction_id, report_id="r1", drift_score=score, created_at=now
                )
            )
    return [event.prediction_id for event in events]


def desk_of(store: FeedbackStore, lease_seconds: float = 600) -> Desk:
    leases = Leases(store.database, lease_seconds)
    return Desk(store, ReviewQueue(store.database, store.settings), leases, Worklog(store, leases))


def test_concurrent_annotators_never_get_the_same_item(store: FeedbackStore) -> None:
    ids = ingest(store, [(f"text number {i} about something else entirely {i * 7}", 0.5 + i / 100) for i in range(6)])
    desk = desk_of(store)
    principals = [f"annotator-{i}" for i in range(8)]
    start = threading.Barrier(len(principals))
    got: dict[str, str | None] = {}
    failures: list[BaseException] = []

    def work(name: str) -> None:
        try:
            start.wait(30)
            found = desk.current(name)
            got[name] = found[0].prediction_id if found else None
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in principals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not failures, failures
    held = [pid for pid in got.values() if pid is not None]
    assert sorted(held) == sorted(ids), "every item leased once, none twice"
    assert list(got.values()).count(None) == 2
    with store.database.read_session() as session:
        leases = list(session.exec(select(DeskLease)))
    assert {(lease.principal, lease.prediction_id) for lease in leases} == {(n, p) for n, p in got.items() if p}
    # Asking again gives each their own item back, and the queue offers the others' items to nobody.
    for name, pid in got.items():
        again = desk.current(name)
        assert (again[0].prediction_id if again else None) == pid
    assert ReviewQueue(store.database, store.settings).next(10) == []


def test_a_lease_expires_and_goes_to_the_next_annotator(store: FeedbackStore) -> None:
    [first, second] = ingest(store, [("the zipper broke on day one", 0.5), ("fine for the price I suppose", 0.55)])
    leases = Leases(store.database, lease_seconds=60)
    queue = ReviewQueue(store.database, store.settings)
    t0 = utcnow()

    taken = leases.take("ann-a", first, now=t0)
    assert taken.expires_at == t0 + timedelta(seconds=60)
    with pytest.raises(LeaseTakenError, match="another annotator"):
        leases.take("ann-b", first, now=t0 + timedelta(seconds=59))
    assert [item.prediction_id for item in queue.next(5, now=t0 + timedelta(seconds=59), principal="ann-b")] == [second]
    assert [item.prediction_id for item in queue.next(5, now=t0, principal="ann-a")] == [first, second]

    later = t0 + timedelta(seconds=61)
    assert [item.prediction_id for item in queue.next(5, now=later, principal="ann-b")] == [first, second]
    assert leases.take("ann-b", first, now=later).principal == "ann-b"
    with pytest.raises(LeaseTakenError):
        leases.take("ann-a", first, now=later)
    # Taking a second item ends the first lease: one item per annotator at a time.
    leases.take("ann-b", second, now=later)
    assert leases.held_by("ann-b", now=later).prediction_id == second  # type: ignore[union-attr]
    assert leases.take("ann-a", first, now=later).principal == "ann-a"


def test_labels_undo_and_agreement(store: FeedbackStore) -> None:
    [mixed, sure] = ingest(store, [("decent but the battery is weak", 0.6), ("an absolute joy to use", 0.97)])
    desk = desk_of(store)
    work = desk.worklog

    mine = work.label("ann-a", "session-1", mixed, "positive", "looks right")
    assert (mine.source, mine.label, mine.comment, mine.status) == ("ann-a", "positive", "looks right", "accepted")
    theirs = work.label("ann-b", "session-9", mixed, "negative", None)
    assert store.get(theirs.feedback_id).status == FeedbackStatus.PENDING
    assert store.get(mine.feedback_id).conflict and store.get(mine.feedback_id).status == FeedbackStatus.PENDING
    assert work.agreement("ann-a").rate == 0.0 and work.agreement("ann-a").compared == 1
    assert work.labelled_since("ann-a", utcnow() - timedelta(hours=1)) == 1

    # Undo is per session: another session of the same annotator has nothing to withdraw.
    assert work.undo("ann-b", "session-other") is None
    undone = work.undo("ann-b", "session-9")
    assert undone is not None and undone.label == "negative" and undone.entry.prediction_id == mixed
    assert work.undo("ann-b", "session-9") is None
    with store.database.read_session() as session:
        assert session.get(Feedback, theirs.feedback_id) is None
        source = session.get(FeedbackSource, "ann-b")
        assert source is not None and source.scored == 0 and source.label_issues == 0
    # The label it conflicted with stands alone again, and the withdrawn item is the undoer's to label again.
    restored = store.get(mine.feedback_id)
    assert (restored.status, restored.conflict) == (FeedbackStatus.ACCEPTED, False)
    assert desk.leases.held_by("ann-b").prediction_id == mixed  # type: ignore[union-attr]
    assert work.agreement("ann-a").compared == 0

    wrong = work.label("ann-a", "session-1", sure, "negative", None)
    assert store.get(wrong.feedback_id).status == FeedbackStatus.PENDING  # a possible label error
    store.resolve(wrong.feedback_id, accept=False, reason="the text is plainly positive", reviewer="rev")
    with pytest.raises(LeaseTakenError):
        work.label("ann-c", "session-5", mixed, "positive", None)
    work.label("ann-b", "session-9", mixed, "positive", None)  # the undoer labels it again, differently
    agreement = work.agreement("ann-a")
    assert (agreement.agreed, agreement.compared) == (1, 2)  # agrees with ann-b now, overruled by the reviewer


def test_label_keys_are_digits_and_unique_first_letters() -> None:
    buttons = label_buttons(["negative", "neutral", "positive", "spam", "urgent", *[f"x{i}" for i in range(6)]])

    assert [(b.label, b.keys) for b in buttons[:5]] == [
        ("negative", "1"),
        ("neutral", "2"),
        ("positive", "3 p"),
        ("spam", "4"),  # s skips
        ("urgent", "5"),  # u undoes
    ]
    assert buttons[-1].keys == ""  # past nine labels: a button without a key


# The pages, served by `bentoml serve`


@dataclass
class Served:
    """The service on a home whose store the tests fill, and keys of two annotators and a reviewer."""

    url: str
    home: Path
    store: FeedbackStore
    annotator: str
    other_annotator: str
    reviewer: str
    bootstrap: str


@pytest.fixture(scope="module")
def served(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    env = {
        **copy_home(trained_home, tmp_path_factory.mktemp("desk") / "home"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
    }
    settings = settings_from(env)
    database = Database.from_settings(settings).upgrade()
    keys = {}
    for name, role in (("ann-1", "annotator"), ("ann-2", "annotator"), ("rev-1", "reviewer")):
        created = run_cli(env, "keys", "create", name, "--role", role)
        assert created.returncode == 0, created.stderr
        keys[name] = created.stdout.strip().splitlines()[-1]
    try:
        with running_service(env) as url:
            yield Served(
                url, settings.home, FeedbackStore(database, settings), keys["ann-1"], keys["ann-2"], keys["rev-1"],
                broker.bootstrap,
            )  # fmt: skip
    finally:
        database.dispose()


@pytest.fixture()
def fresh(served: Served) -> Served:
    """The served store emptied of predictions, labels and desk state, so each test sees only its own items."""
    with served.store.database.session() as session:
        for table in (DeskLease, DeskEntry, DriftTarget, Feedback, FeedbackSource, Prediction):
            session.execute(delete(table))
    return served


def log_in(page: Page, served: Served, key: str, target: str = "/desk") -> None:
    page.goto(f"{served.url}/login?next={target}")
    page.fill("#key", key)
    page.click("#login")
    page.wait_for_url(f"{served.url}{target}")


def shown(page: Page) -> str:
    """The prediction id of the item the desk shows."""
    return page.get_attribute("#item", "data-prediction-id") or ""


def press(page: Page, key: str) -> None:
    """Press ``key`` and wait for the page the form post leads to."""
    with page.expect_navigation():
        page.keyboard.press(key)


def labels_of(served: Served, principal: str) -> dict[str, Feedback]:
    with served.store.database.read_session() as session:
        rows = session.exec(select(Feedback).where(col(Feedback.source) == principal))
        return {row.prediction_id or "": row for row in rows}


@pytest.mark.slow
def test_an_annotator_labels_five_items_with_the_keyboard(fresh: Served, page: Page) -> None:
    texts = [
        ("battery died in two days", 0.97),
        ("okay I guess, nothing more", 0.5),
        ("it works, mostly", 0.52),
        ("not sure how I feel about it", 0.45),
        ("could have been better honestly", 0.56),
        ("solid purchase overall", 0.6),
    ]
    ids = ingest(fresh.store, texts, drift={0: 0.8})
    log_in(page, fresh, fresh.annotator)

    assert page.locator("#drift-mark").is_visible(), "the drift target comes first, marked"
    assert page.inner_text("#text") == texts[0][0]
    assert page.inner_text("#model-label") == "positive" and page.inner_text("#confidence") == "97%"
    assert page.locator("#labels button").all_inner_texts() == ["1 negative n", "2 positive p"]
    assert page.inner_text("#queue-left") == "6"
    given: list[tuple[str, str]] = []
    for key, label in (("n", "negative"), ("2", "positive"), ("1", "negative"), ("p", "positive"), ("2", "positive")):
        item = shown(page)
        if given:
            assert page.locator("#drift-mark").count() == 0
        press(page, key)
        assert page.inner_text("#notice").startswith(f"Saved '{label}': ")
        given.append((item, label))

    assert [item for item, _ in given] == ids[:5]
    assert page.inner_text("#labelled-today") == "5" and page.inner_text("#queue-left") == "1"
    stored = labels_of(fresh, "ann-1")
    assert {pid: row.label for pid, row in stored.items()} == dict(given)
    vetter = fresh.store.vetter
    for (item, label), (_, positive) in zip(given, texts, strict=False):
        issue = vetter.score(label, {"negative": round(1 - positive, 6), "positive": positive}).label_issue
        assert stored[item].status == (FeedbackStatus.PENDING if issue else FeedbackStatus.ACCEPTED)
    assert stored[ids[0]].status_reason.startswith("possible label error")  # type: ignore[union-attr]
    wanted = {row.feedback_id for row in stored.values()}
    events = read_topic(
        fresh.bootstrap, Topic.FEEDBACK, lambda seen: wanted <= {getattr(e, "feedback_id", "") for e in seen}
    )
    announced = {e.feedback_id: e for e in events if isinstance(e, FeedbackEvent) and e.feedback_id in wanted}
    assert {e.source for e in announced.values()} == {"ann-1"} and set(announced) == wanted


@pytest.mark.slow
def test_undo_withdraws_the_last_label_and_shows_its_item_again(fresh: Served, page: Page) -> None:
    first, _ = ingest(fresh.store, [("meh, it is fine", 0.5), ("I would buy it again", 0.58)])
    log_in(page, fresh, fresh.annotator)
    assert shown(page) == first

    press(page, "2")
    assert shown(page) != first and page.inner_text("#labelled-today") == "1"
    press(page, "u")

    assert page.inner_text("#notice").startswith("Withdrew your last label")
    assert shown(page) == first and page.inner_text("#labelled-today") == "0"
    assert labels_of(fresh, "ann-1") == {}
    press(page, "u")
    assert page.inner_text("#notice").startswith("Nothing to undo")


@pytest.mark.slow
def test_the_desk_works_without_its_script(fresh: Served, browser: Browser) -> None:
    [item] = ingest(fresh.store, [("arrived on time, works", 0.62)])
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        log_in(page, fresh, fresh.annotator)
        page.fill("#comment", "clicked, not typed")
        with page.expect_navigation():
            page.click("#labels button[value=positive]")
        assert page.inner_text("#notice").startswith("Saved 'positive'")
    finally:
        context.close()
    row = labels_of(fresh, "ann-1")[item]
    assert (row.label, row.comment) == ("positive", "clicked, not typed")


@pytest.mark.slow
def test_two_annotators_never_hold_the_same_item(fresh: Served, page: Page) -> None:
    ids = ingest(fresh.store, [("hmm", 0.5), ("so-so screen", 0.51), ("average sound", 0.53)])
    log_in(page, fresh, fresh.annotator)
    mine = shown(page)
    other = {"X-API-Key": fresh.other_annotator}

    with httpx.Client(base_url=fresh.url, headers=other, timeout=30) as http:
        desk = http.get("/desk")
        assert desk.status_code == 200
        theirs = re.search(r'data-prediction-id="([^"]+)"', desk.text)
        assert theirs is not None and theirs[1] != mine and {mine, theirs[1]} <= set(ids)
        queue = http.get("/review").json()
        assert [item["prediction_id"] for item in queue] == [pid for pid in ids if pid not in (mine, theirs[1])]
        refused = http.post("/desk/label", data={"prediction_id": mine, "label": "positive"})
        assert refused.status_code == 409 and "another annotator is working on this item" in refused.text
    assert labels_of(fresh, "ann-2") == {}

    press(page, "p")
    assert labels_of(fresh, "ann-1")[mine].label == "positive"


@pytest.mark.slow
def test_a_reviewer_resolves_a_held_label_in_the_reviewer_view(fresh: Served, page: Page) -> None:
    [item] = ingest(fresh.store, [("a delight from start to finish", 0.97)])
    with httpx.Client(base_url=fresh.url, headers={"X-API-Key": fresh.other_annotator}, timeout=30) as http:
        assert http.get("/desk").status_code == 200
        given = http.post("/desk/label", data={"prediction_id": item, "label": "negative", "comment": HOSTILE_COMMENT})
        assert given.status_code == 303, given.text
        assert http.get("/desk/review").status_code == 403
    held = labels_of(fresh, "ann-2")[item]
    assert held.status == FeedbackStatus.PENDING and held.label_issue

    log_in(page, fresh, fresh.reviewer, "/desk/review")
    article = page.locator(f"#held-{held.feedback_id}")
    assert article.locator(".label").inner_text() == "negative"
    assert article.locator(".source").inner_text() == "ann-2"
    assert article.locator(".reason").inner_text().startswith("possible label error")
    assert article.locator(".comment").inner_text() == f"Comment: {HOSTILE_COMMENT}"
    article.locator("input[name=reason]").fill("the text is plainly positive")
    with page.expect_navigation():
        article.locator("button.reject").click()

    assert page.inner_text("#notice") == "Rejected: 'negative' from ann-2."
    assert page.locator(f"#held-{held.feedback_id}").count() == 0
    decided = fresh.store.get(held.feedback_id)
    assert (decided.status, decided.status_reason) == ("rejected", "reviewer rev-1: the text is plainly positive")
    [audit] = AuditLog(fresh.store.database).recent(1, "feedback.reject")
    assert (audit.actor, audit.target) == ("rev-1", held.feedback_id)
    assert page.evaluate(PWNED) == []


@pytest.mark.slow
def test_hostile_texts_are_shown_as_text_and_never_run(fresh: Served, page: Page) -> None:
    ids = ingest(fresh.store, [(text, 0.5) for text in HOSTILE_TEXTS], drift={0: 0.9, 1: 0.8})
    log_in(page, fresh, fresh.annotator)

    for item, text in zip(ids, HOSTILE_TEXTS, strict=True):
        assert shown(page) == item
        assert page.inner_text("#text") == text
        assert page.locator("img, svg, #text script").count() == 0
        assert page.evaluate(PWNED) == []
        page.fill("#comment", HOSTILE_COMMENT)
        page.keyboard.press("Escape")  # out of the comment box, so keys label again
        press(page, "1")
    assert page.evaluate(PWNED) == []
    assert {row.comment for row in labels_of(fresh, "ann-1").values()} == {HOSTILE_COMMENT}
    answer = httpx.get(f"{fresh.url}/desk", headers={"X-API-Key": fresh.annotator}, timeout=30)
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    script = httpx.get(f"{fresh.url}/desk/desk.js", timeout=30)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")


@pytest.mark.slow
def test_forms_without_their_csrf_token_are_refused(fresh: Served, page: Page) -> None:
    [item] = ingest(fresh.store, [("it is what it is", 0.5)])
    page.goto(f"{fresh.url}/desk")
    assert page.url == f"{fresh.url}/login?next=/desk", "a browser without a session is sent to log in"
    log_in(page, fresh, fresh.annotator)
    assert shown(page) == item

    for path, form in (
        ("/desk/label", {"prediction_id": item, "label": "positive"}),
        ("/desk/label", {"prediction_id": item, "label": "positive", "csrf_token": "0" * 64}),
        ("/desk/skip", {"prediction_id": item}),
        ("/desk/undo", {}),
    ):
        refused = page.request.post(f"{fresh.url}{path}", form=form)
        assert refused.status == 403 and "CSRF token" in refused.text(), (path, form)
    assert labels_of(fresh, "ann-1") == {}
    with fresh.store.database.read_session() as session:
        assert list(session.exec(select(DeskEntry))) == []
