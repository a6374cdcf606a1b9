"""``flywheel replay``: logged traffic scored with a candidate, compared with what was served.

The window is crafted so the answer is known: half the texts are logged with the label the tiny champion gives
them, half with the other label, so replaying the champion agrees on exactly the first half.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from rich.console import Console

from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.events import PredictionEvent, new_id, utcnow
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.replay import Replay, ReplayError, ReplayResult, parse_since, wilson
from tests.conftest import run_cli
from tests.retrain.conftest import trust
from tests.support import synthetic_sentiment

OTHER = {"positive": "negative", "negative": "positive"}


@dataclass
class Window:
    """The stored traffic: texts, the champion's label of each, and the label logged for each."""

    version: str
    texts: list[str]
    champion: list[str]
    logged: list[str]

    @property
    def agreeing(self) -> list[str]:
        return [t for t, c, g in zip(self.texts, self.champion, self.logged, strict=True) if c == g]

    @property
    def flipped(self) -> list[str]:
        return [t for t, c, g in zip(self.texts, self.champion, self.logged, strict=True) if c != g]


def logged(text: str, label: str, at: datetime, version: str = "v-served") -> PredictionEvent:
    """A prediction the serving model made with 0.8 confidence."""
    scores = {label: 0.8, OTHER[label]: 0.2}
    return PredictionEvent(
        prediction_id=new_id(), model_version=version, text=text, label=label, confidence=0.8, scores=scores,
        latency_ms=1.0, emitted_at=at,
    )


def store_events(store: FeedbackStore, events: list[PredictionEvent]) -> None:
    assert store.ingest([prediction_row(event, utcnow()) for event in events]).inserted == len(events)


@pytest.fixture()
def window(store: FeedbackStore) -> Window:
    """40 texts logged an hour ago, the first 20 by v-served with the champion's label, the rest by v-other with the
    opposite one."""
    entry = ModelRegistry(Settings()).champion_version()
    classifier = Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=entry.version)
    texts = synthetic_sentiment(40, seed=7)["text"].tolist()
    champion = [classifier.labels[i] for i in classifier.predict_proba(texts).probs.argmax(axis=1)]
    labels = [label if i < 20 else OTHER[label] for i, label in enumerate(champion)]
    hour_ago = utcnow() - timedelta(hours=1)
    store_events(
        store,
        [
            logged(text, label, hour_ago - timedelta(seconds=i), "v-served" if i < 20 else "v-other")
            for i, (text, label) in enumerate(zip(texts, labels, strict=True))
        ],
    )
    return Window(entry.version, texts, champion, labels)


def rendered(result: ReplayResult) -> str:
    """The tables as a terminal 200 characters wide shows them."""
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(result.render())
    return console.export_text()


def test_replaying_the_champion_agrees_exactly_where_the_logs_do(database: Database, window: Window) -> None:
    result = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("24h"), limit=1000, top=40
    )

    assert (result.agreement.agreed, result.agreement.texts, result.agreement.rate) == (20, 40, 0.5)
    assert result.agreement.low < 0.5 < result.agreement.high
    assert (result.agreement.low, result.agreement.high) == pytest.approx(wilson(20, 40))
    assert result.window.served_by == {"v-served": 20, "v-other": 20}
    assert {item.text for item in result.disagreements} == set(window.flipped)
    assert all(item.served_by == "v-other" and item.logged_confidence == 0.8 for item in result.disagreements)
    strengths = [item.strength for item in result.disagreements]
    assert strengths == sorted(strengths, reverse=True)
    assert result.feedback is None

    served, champion = Counter(window.logged), Counter(window.champion)
    shifts = {shift.label: shift for shift in result.labels}
    assert set(shifts) == {"negative", "positive"}
    for name, shift in shifts.items():
        assert (shift.logged, shift.candidate) == (served[name], champion[name])
        assert shift.shift_points == pytest.approx((champion[name] - served[name]) / 40 * 100)
        assert shift.logged_model_has and shift.candidate_has
    changes = Counter((g, c) for c, g in zip(window.champion, window.logged, strict=True) if c != g)
    assert {(cell.logged, cell.candidate): cell.texts for cell in result.confusion} == dict(changes)
    assert result.confidence.logged == pytest.approx(0.8)


def test_a_label_the_candidate_lacks_shifts_to_the_ones_it_has(
    database: Database, store: FeedbackStore, window: Window
) -> None:
    # Ten more texts were served as "neutral", a label the champion has no output for.
    extra = synthetic_sentiment(10, seed=11)["text"].tolist()
    at = utcnow() - timedelta(minutes=30)
    store_events(
        store,
        [
            PredictionEvent(
                prediction_id=new_id(), model_version="v-three", text=text, label="neutral", confidence=0.6,
                scores={"neutral": 0.6, "positive": 0.2, "negative": 0.2}, latency_ms=1.0, emitted_at=at,
            )
            for text in extra
        ],
    )

    result = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("24h"), limit=1000, top=10
    )

    shifts = {shift.label: shift for shift in result.labels}
    assert [shift.label for shift in result.labels] == [*result.candidate_labels, "neutral"]
    neutral = shifts["neutral"]
    assert (neutral.logged, neutral.candidate, neutral.candidate_has, neutral.logged_model_has) == (10, 0, False, True)
    assert neutral.shift_points == pytest.approx(-20.0)
    assert sum(shift.shift_points for shift in result.labels) == pytest.approx(0.0)
    served = Counter(window.logged)
    for name in result.candidate_labels:
        assert shifts[name].logged == served[name]
    assert sum(shifts[name].candidate for name in result.candidate_labels) == 50
    assert result.agreement.texts == 50 and result.agreement.agreed == 20
    assert "the candidate lacks it" in rendered(result)


def test_top_bounds_the_disagreements_shown(database: Database, window: Window) -> None:
    result = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("24h"), limit=1000, top=3
    )

    assert len(result.disagreements) == 3
    assert {item.text for item in result.disagreements} <= set(window.flipped)


def test_feedback_judges_both_sides_on_the_labelled_texts(
    database: Database, store: FeedbackStore, window: Window
) -> None:
    # People label four texts of each half with the champion's label: the champion is right on all eight, the
    # served labels on the four it agreed with.
    trust(store)
    chosen = window.agreeing[:4] + window.flipped[:4]
    truth = dict(zip(window.texts, window.champion, strict=True))
    assert store.import_labels([(text, truth[text]) for text in chosen], source="annotation").created == 8

    result = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("24h"), limit=1000, top=10
    )

    assert result.feedback is not None
    assert (result.feedback.labelled, result.feedback.conflicting) == (8, 0)
    assert (result.feedback.candidate_correct, result.feedback.logged_correct) == (8, 4)
    assert (result.feedback.candidate_accuracy, result.feedback.logged_accuracy) == (1.0, 0.5)


def test_the_window_excludes_older_rows_and_counts_each_text_once(
    database: Database, store: FeedbackStore, window: Window
) -> None:
    now = utcnow()
    older = synthetic_sentiment(5, seed=99)["text"].tolist()
    # Three days old, and a second, older prediction of a text already in the window with another label.
    store_events(store, [logged(text, "positive", now - timedelta(days=3)) for text in older])
    store_events(store, [logged(window.texts[0], OTHER[window.logged[0]], now - timedelta(hours=2))])

    day = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("24h"), limit=1000, top=10
    )
    week = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("7d"), limit=1000, top=10
    )

    assert (day.window.predictions, day.window.texts) == (41, 40)
    assert day.agreement.agreed == 20  # the newest prediction of the repeated text is the one compared
    assert (week.window.predictions, week.window.texts) == (46, 45)
    assert not week.window.limited


def test_limit_keeps_the_newest_texts_and_says_so(database: Database, window: Window) -> None:
    result = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("24h"), limit=10, top=10
    )

    # The first texts are the newest: all served by v-served with the champion's label.
    assert (result.window.texts, result.window.predictions, result.window.limited) == (10, 40, True)
    assert result.agreement.agreed == 10
    assert "limited to the newest 10 texts: older predictions were not read; raise --limit" in rendered(result)


def test_a_busy_window_is_read_in_pages_and_each_text_counted_once(
    home_env: dict[str, str], database_url: str
) -> None:
    # 5,010 predictions of three texts, all logged at the same instant: the pages are ordered by id alone, and the
    # third text's only predictions (the oldest ids) lie beyond the first page of 5,000.
    database = Database(database_url).upgrade()
    try:
        store = FeedbackStore(database, Settings())
        at = utcnow() - timedelta(minutes=5)
        texts = ["the plot was superb 1", "a boring story 2", "the cast was great 3"]
        order = [texts[2]] * 10 + [texts[1]] * 2500 + [texts[0]] * 2500
        store_events(store, [logged(text, "positive", at) for text in order])
        version = ModelRegistry(Settings()).champion_version().version

        result = Replay(database, ModelRegistry(Settings()), progress=False).run(
            version, parse_since("1h"), limit=1000, top=10
        )
    finally:
        database.dispose()

    assert (result.window.predictions, result.window.texts, result.window.limited) == (5010, 3, False)
    assert sum(shift.logged for shift in result.labels) == 3


def test_served_by_keeps_one_versions_traffic(database: Database, window: Window) -> None:
    result = Replay(database, ModelRegistry(Settings()), progress=False).run(
        window.version, parse_since("24h"), limit=1000, top=10, served_by="v-other"
    )

    assert result.window.served_by == {"v-other": 20}
    assert result.agreement.agreed == 0


def test_an_empty_window_says_how_to_widen_it(database: Database, window: Window) -> None:
    replayer = Replay(database, ModelRegistry(Settings()), progress=False)

    with pytest.raises(ReplayError, match=r"no predictions logged since .* widen the window with --since"):
        replayer.run(window.version, parse_since("30m"), limit=1000, top=10)
    with pytest.raises(ReplayError, match="no predictions served by v-gone are stored at all"):
        replayer.run(window.version, parse_since("24h"), limit=1000, top=10, served_by="v-gone")


def test_since_takes_spans_and_timestamps() -> None:
    now = datetime.fromisoformat("2024-05-02T12:00:00+00:00")

    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2024-05-01T08:00:00Z", now) == datetime.fromisoformat("2024-05-01T08:00:00+00:00")
    assert parse_since("2024-05-01", now) == datetime.fromisoformat("2024-05-01T00:00:00+00:00")
    for bad in ("yesterday", "24", "h", "-3h", "0h", "2024-13-01"):
        with pytest.raises(ReplayError, match="--since"):
            parse_since(bad, now)
    with pytest.raises(ReplayError, match="not in the past"):
        parse_since("2024-06-01", now)


def test_the_command_prints_tables_json_and_one_line_errors(home_env: dict[str, str], window: Window) -> None:
    tables = run_cli(home_env, "replay", window.version, "--since", "24h")
    assert tables.returncode == 0, tables.stderr
    assert "agreement with the served label: 50.0% (20/40" in tables.stdout
    assert "served by: v-served 20, v-other 20" in tables.stdout
    shown = [text for text in window.texts if text in tables.stdout]
    assert len(shown) == 10 and set(shown) <= set(window.flipped)  # the top 10 disagreements, nothing else

    as_json = run_cli(home_env, "replay", window.version, "--json", "--top", "2", "--served-by", "v-other")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["agreement"]["agreed"] == 0
    assert report["window"]["served_by"] == {"v-other": 20}
    assert len(report["disagreements"]) == 2
    assert {shift["label"] for shift in report["labels"]} == {"negative", "positive"}

    for args, message in [
        (("--since", "yesterday"), "error: --since 'yesterday' is neither a span nor a time"),
        (("--since", "30m"), "error: no predictions logged since"),
    ]:
        failed = run_cli(home_env, "replay", window.version, *args)
        assert failed.returncode == 2
        assert failed.stderr.strip().splitlines()[-1].startswith(message)
        assert "Traceback" not in failed.stderr

    unknown = run_cli(home_env, "replay", "nope123")
    assert unknown.returncode == 2
    assert "model version 'nope123' not found" in unknown.stderr
