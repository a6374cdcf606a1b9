"""The annotation desk's pages: what an annotator and a reviewer see, built from the store, the queue and the leases.

The pages are Jinja2 templates in ``feedback/templates`` with autoescape on, so a text from traffic or a label name
is shown as typed and can never open a tag. They run one script, ``feedback/static/desk.js``, served from this
site; the Content-Security-Policy allows no other (nothing inline), and every control is a plain HTML form.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import col, select

from feedback.leases import ItemGoneError, Leases, LeaseTakenError
from feedback.review import ReviewItem, ReviewQueue
from feedback.store import FeedbackStore
from feedback.worklog import Agreement, Worklog
from flywheel.access import Caller
from flywheel.events import utcnow
from flywheel.models.access import Role
from flywheel.models.desk import DeskLeasePublic
from flywheel.models.feedback import Feedback, FeedbackPublic, FeedbackStatus
from flywheel.pages import page_headers, templates

#: The desk's pages run only the same-origin script, submit forms only here, and cannot be framed.
PAGE_HEADERS = page_headers(script=True)
#: Keys the desk keeps for itself; a label starting with one of these letters gets only its digit.
SKIP_KEY = "s"
UNDO_KEY = "u"
#: Review-queue items asked for per attempt to lease one: a few, as other annotators may take the first ones.
CANDIDATES = 5
#: Rounds of asking the queue again when others took every candidate first.
ATTEMPTS = 3
#: Held labels listed on the reviewer's page, oldest first.
HELD_SHOWN = 50


def render(template: str, **context: object) -> str:
    """``template`` from ``feedback/templates`` rendered with ``context``."""
    return templates("feedback").get_template(template).render(**context)


@functools.cache
def script() -> bytes:
    """The desk's keyboard script, read once on first use."""
    return (importlib.resources.files("feedback") / "static" / "desk.js").read_bytes()


@dataclass(frozen=True)
class LabelButton:
    """One label's button and the keys that press it: its position 1-9 and its first letter when that is unique."""

    label: str
    digit: str | None
    letter: str | None

    @property
    def keys(self) -> str:
        """The keys, space-separated, as the script reads them from ``data-keys``."""
        return " ".join(key for key in (self.digit, self.letter) if key)


def label_buttons(labels: Sequence[str]) -> list[LabelButton]:
    """A button per label, in order; ambiguous or reserved first letters are left to the digits."""
    firsts = Counter(label[:1].lower() for label in labels)
    buttons = []
    for index, label in enumerate(labels):
        first = label[:1].lower()
        letter = first if first.isalpha() and firsts[first] == 1 and first not in (SKIP_KEY, UNDO_KEY) else None
        buttons.append(LabelButton(label, str(index + 1) if index < 9 else None, letter))
    return buttons


@dataclass(frozen=True)
class HeldLabel:
    """A label waiting for a reviewer, with the other standing labels of its text."""

    feedback: FeedbackPublic
    others: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DeskPage:
    """Everything the annotator's page shows."""

    caller: Caller
    csrf_token: str
    item: ReviewItem | None
    lease: DeskLeasePublic | None
    buttons: list[LabelButton]
    labelled_today: int
    queue_left: int
    agreement: Agreement
    max_comment_chars: int
    notice: str = ""
    error: str = ""

    @property
    def reviewer(self) -> bool:
        """Whether the caller may open the reviewer's view."""
        return self.caller.may(Role.REVIEWER)

    def html(self) -> str:
        """The page."""
        return render("desk.html", page=self, skip_key=SKIP_KEY, undo_key=UNDO_KEY)


@dataclass(frozen=True)
class ReviewPage:
    """Everything the reviewer's view shows."""

    caller: Caller
    csrf_token: str
    held: list[HeldLabel]
    notice: str = ""
    error: str = ""

    def html(self) -> str:
        """The page."""
        return render("desk_review.html", page=self)


class Desk:
    """The desk's reads and its choice of the next item, for one opened database."""

    def __init__(self, store: FeedbackStore, queue: ReviewQueue, leases: Leases, worklog: Worklog) -> None:
        self.store = store
        self.queue = queue
        self.leases = leases
        self.worklog = worklog

    def current(self, principal: str) -> tuple[ReviewItem, DeskLeasePublic] | None:
        """The item ``principal`` works on: the one they hold while it is still open, else the first the queue
        offers them that nobody else takes first; None when the queue has nothing for them."""
        held = self.leases.held_by(principal)
        if held is not None:
            item = self.queue.item(held.prediction_id, principal)
            # Expired and taken over just now, or deleted: then on to the queue.
            with contextlib.suppress(LeaseTakenError, ItemGoneError):
                if item is not None:
                    return item, self.leases.take(principal, item.prediction_id)
        for _ in range(ATTEMPTS):
            candidates = self.queue.next(CANDIDATES, principal=principal)
            if not candidates:
                return None
            for candidate in candidates:
                try:
                    return candidate, self.leases.take(principal, candidate.prediction_id)
                except (LeaseTakenError, ItemGoneError):
                    continue
        return None

    def page(self, caller: Caller, csrf_token: str, labels: Sequence[str], max_comment_chars: int) -> DeskPage:
        """The annotator's page for ``caller`` (leasing them an item), without notice or error."""
        now = utcnow()
        found = self.current(caller.name)
        return DeskPage(
            caller=caller,
            csrf_token=csrf_token,
            item=found[0] if found else None,
            lease=found[1] if found else None,
            buttons=label_buttons(labels),
            labelled_today=self.worklog.labelled_since(caller.name, start_of_day(now)),
            queue_left=self.queue.remaining(caller.name, now),
            agreement=self.worklog.agreement(caller.name),
            max_comment_chars=max_comment_chars,
        )

    def held(self, limit: int = HELD_SHOWN) -> list[HeldLabel]:
        """Labels waiting for a reviewer whose text is known, oldest first, each with its text's other labels."""
        with self.store.database.read_session() as session:
            rows = list(
                session.exec(
                    select(Feedback)
                    .where(col(Feedback.status) == FeedbackStatus.PENDING, col(Feedback.text).is_not(None))
                    .order_by(col(Feedback.created_at))
                    .limit(limit)
                )
            )
            keys = {row.text_key for row in rows if row.text_key}
            others: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for key, feedback_id, label, source in session.exec(
                select(Feedback.text_key, Feedback.feedback_id, Feedback.label, Feedback.source).where(
                    col(Feedback.text_key).in_(keys), col(Feedback.status) != FeedbackStatus.REJECTED
                )
            ):
                others[key or ""].append((feedback_id, f"{label!r} from {source}"))
        return [
            HeldLabel(
                FeedbackPublic.model_validate(row),
                sorted(text for other, text in others.get(row.text_key or "", []) if other != row.feedback_id),
            )
            for row in rows
        ]


def start_of_day(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day: "today" on the desk."""
    return now.replace(hour=0, minute=0, second=0, microsecond=0)
