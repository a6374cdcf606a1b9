"""The label ledger on both databases: which accepted labels are trusted, which count as new for the trigger.

Rows are written straight into the core's tables, as any writer of them would leave them; the feedback package's
rules for getting there are its own tests' business.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from flywheel.access import ANONYMOUS
from flywheel.database import Database
from flywheel.events import new_id, utcnow
from flywheel.labels import LabelLedger
from flywheel.models.feedback import Feedback, FeedbackSource, FeedbackStatus


@pytest.fixture()
def database(database_url: str) -> Iterator[Database]:
    database = Database(database_url).upgrade()
    yield database
    database.dispose()


def add(database: Database, source: str, text: str, status: str = FeedbackStatus.ACCEPTED, **values: Any) -> str:
    """Store one label of ``source`` for ``text``, accepted unless told otherwise; returns its feedback id."""
    feedback_id = new_id()
    with database.session() as session:
        row = Feedback(feedback_id=feedback_id, source=source, text=text, label="positive", status=status, **values)
        session.add(row)
    return feedback_id


def sources(database: Database, **trusted: bool) -> None:
    with database.session() as session:
        for name, value in trusted.items():
            session.add(FeedbackSource(source=name, trusted=value))


def test_a_label_is_trusted_when_its_source_is_trusted_or_a_reviewer_confirmed_it(database: Database) -> None:
    sources(database, annotator=True, crowd=False)
    by_annotator = add(database, "annotator", "sturdy case")
    by_crowd = add(database, "crowd", "flimsy case")
    confirmed = add(database, "crowd", "laggy phone", confirmed_by="reviewer-1")
    unknown_source = add(database, "newcomer", "speedy delivery")
    add(database, "annotator", "still waiting", status=FeedbackStatus.PENDING)

    rows = {row.feedback_id: row for row in LabelLedger(database).training_rows()}

    assert {key: row.trusted for key, row in rows.items()} == {
        by_annotator: True,
        by_crowd: False,
        confirmed: True,
        unknown_source: False,
    }
    assert rows[by_crowd].source == "crowd"


def test_anonymous_labels_count_as_new_only_once_vetted(database: Database) -> None:
    ledger = LabelLedger(database)
    for i in range(3):
        add(database, ANONYMOUS, f"unvetted {i}")
    assert ledger.count_new(None) == 0, "unvetted anonymous labels must not trigger a retrain"
    assert len(ledger.training_rows()) == 3, "they may still train"

    add(database, ANONYMOUS, "scored by the model", label_quality=0.7)
    add(database, ANONYMOUS, "looked at by a reviewer", confirmed_by="reviewer-1")
    add(database, "annotator", "an annotator's label without evidence")
    assert ledger.count_new(None) == 3

    later = add(database, "annotator", "tomorrow's label", created_at=utcnow() + timedelta(days=1))
    assert ledger.count_new(utcnow() + timedelta(hours=1)) == 1
    assert ledger.mark_used([later], "v2") == 1
    assert ledger.count_new(utcnow() + timedelta(hours=1)) == 0
