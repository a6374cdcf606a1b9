"""The review queue: least-confident recent unlabeled predictions first, near-duplicates collapsed."""

from __future__ import annotations

from datetime import timedelta

from feedback.prediction_rows import prediction_row
from feedback.review import NearDuplicates, ReviewQueue
from feedback.store import FeedbackStore
from flywheel.events import utcnow
from flywheel.models.feedback import FeedbackCreate
from tests.feedback.conftest import prediction


def test_queue_orders_by_margin_then_recency_and_collapses_duplicates(store: FeedbackStore) -> None:
    now = utcnow()
    ago = lambda minutes: now - timedelta(minutes=minutes)  # noqa: E731
    crafted = {
        "unsure": prediction("the plot was okay I guess, nothing special at all", 0.51, at=ago(5)),
        "exact copy": prediction("The plot was OKAY, I guess... nothing special at all!", 0.52, at=ago(4)),
        "near copy": prediction("the plot was okay I guess, nothing special at all really", 0.525, at=ago(3)),
        "newer tie": prediction("mixed feelings about the cast", 0.55, at=ago(1)),
        "older tie": prediction("hard to say if I liked it", 0.55, at=ago(30)),
        "confident": prediction("a total delight from start to finish", 0.99, at=ago(2)),
        "labeled": prediction("could go either way", 0.50, at=ago(2)),
        "too old": prediction("ancient and uncertain", 0.50, at=now - timedelta(days=30)),
    }
    store.ingest([prediction_row(event, now) for event in crafted.values()])
    store.submit(FeedbackCreate(prediction_id=crafted["labeled"].prediction_id, label="positive"), principal="web")

    queue = ReviewQueue(store.database, store.settings)
    items = queue.next(limit=10, now=now)
    by_id = {event.prediction_id: name for name, event in crafted.items()}
    assert [by_id[item.prediction_id] for item in items] == ["unsure", "newer tie", "older tie", "confident"]
    assert items[0].similar == 2
    assert items[0].margin < items[1].margin
    assert [by_id[item.prediction_id] for item in queue.next(limit=2, now=now)] == ["unsure", "newer tie"]


def test_near_duplicates_need_the_similarity_threshold() -> None:
    groups = NearDuplicates(threshold=0.8)
    assert groups.match("one two three four five six seven eight nine ten") is None
    assert groups.match("one two three four five six seven eight nine ten eleven") == 0
    assert groups.match("one two three four five something else entirely here") is None
    assert groups.match("") is None


def test_drift_targets_go_to_the_front_of_the_queue(store: FeedbackStore) -> None:
    from flywheel.models.drift import DriftTarget

    now = utcnow()
    crafted = {
        "unsure": prediction("could be good, could be bad", 0.51, at=now),
        "shifted": prediction("der Akku ist nach zwei Tagen leer", 0.97, at=now),
        "more shifted": prediction("la batería murió en dos días", 0.99, at=now),
    }
    store.ingest([prediction_row(event, now) for event in crafted.values()])
    with store.database.session() as session:
        for name, score in (("shifted", 0.7), ("more shifted", 0.9)):
            session.add(DriftTarget(prediction_id=crafted[name].prediction_id, report_id="r1", drift_score=score))

    items = ReviewQueue(store.database, store.settings).next(limit=3, now=now)
    by_id = {event.prediction_id: name for name, event in crafted.items()}
    assert [by_id[item.prediction_id] for item in items] == ["more shifted", "shifted", "unsure"]
    assert [item.drift_score for item in items] == [0.9, 0.7, None]
