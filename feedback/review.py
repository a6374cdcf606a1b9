"""The review queue: unlabeled recent predictions the model was least sure of, near-duplicates collapsed.

Texts leased to an annotator at the desk (``feedback.leases``) are offered to nobody else until the lease expires,
and a text an annotator skipped there is not offered to them again.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func
from sqlmodel import col, select

from flywheel.database import Database
from flywheel.events import utcnow
from flywheel.models.desk import DeskAction, DeskEntry, DeskLease
from flywheel.models.drift import DriftTarget
from flywheel.models.feedback import Feedback, FeedbackStatus, Prediction, PredictionPublic
from flywheel.settings import Settings
from flywheel.text import dedupe_key

#: How many candidates are read per requested item before near-duplicates are collapsed.
SCAN_FACTOR = 20
MAX_LIMIT = 500


class ReviewItem(PredictionPublic):
    """A prediction worth a label, with how many near-duplicates it stands for."""

    similar: int = 0
    #: Set when a drift report found this request among the most unlike the training data.
    drift_score: float | None = None


class NearDuplicates:
    """Greedy near-duplicate grouping by word-set Jaccard similarity, with prefix filtering.

    Two sets with Jaccard >= t must share a token among the first ``|x| - ceil(t*|x|) + 1`` tokens of
    each (in one global order), so only items sharing such a prefix token are compared.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.kept: list[frozenset[str]] = []
        self._index: dict[str, list[int]] = {}

    def _prefix(self, tokens: frozenset[str]) -> list[str]:
        ordered = sorted(tokens)
        return ordered[: len(ordered) - math.ceil(self.threshold * len(ordered)) + 1]

    def match(self, text: str) -> int | None:
        """Index of the kept item ``text`` duplicates; otherwise keep it and return None."""
        tokens = frozenset(dedupe_key(text).split())
        candidates = {i for token in self._prefix(tokens) for i in self._index.get(token, ())}
        for i in sorted(candidates):
            other = self.kept[i]
            union = len(tokens | other)
            if union == 0 or len(tokens & other) / union >= self.threshold:
                return i
        self.kept.append(tokens)
        for token in self._prefix(tokens):
            self._index.setdefault(token, []).append(len(self.kept) - 1)
        return None


class ReviewQueue:
    """Picks the predictions a label would teach the model most (uncertainty sampling)."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.window = timedelta(hours=settings.review_window_hours)
        self.similarity = settings.review_similarity

    def next(self, limit: int = 20, now: datetime | None = None, principal: str | None = None) -> list[ReviewItem]:
        """Up to ``limit`` unlabeled predictions: drift targets first (newest report), then smallest margin, newest.

        Texts leased at the desk to anyone but ``principal`` are left out, and so are the texts ``principal`` skipped.
        """
        limit = max(1, min(limit, MAX_LIMIT))
        now = now or utcnow()
        lease_holder = (
            select(DeskLease.principal)
            .where(col(DeskLease.text_key) == col(Prediction.text_key), col(DeskLease.expires_at) > now)
            .scalar_subquery()
        )
        with self.database.read_session() as session:
            candidates = list(
                session.exec(
                    select(Prediction, DriftTarget.drift_score, lease_holder)
                    .outerjoin(DriftTarget, col(DriftTarget.prediction_id) == col(Prediction.prediction_id))
                    .where(*self._open(now, principal))
                    .order_by(
                        col(DriftTarget.prediction_id).is_(None),
                        col(DriftTarget.created_at).desc(),
                        col(DriftTarget.drift_score).desc(),
                        col(Prediction.margin),
                        col(Prediction.created_at).desc(),
                    )
                    .limit(limit * SCAN_FACTOR)
                )
            )
        items: list[ReviewItem] = []
        #: Whether each item is leased to someone else: grouped first, so its near-duplicates go with it.
        held: list[bool] = []
        seen_keys: dict[str, int] = {}
        groups = NearDuplicates(self.similarity)
        for prediction, drift_score, holder in candidates:
            index = seen_keys.get(prediction.text_key)
            if index is None:
                index = groups.match(prediction.text)
            if index is not None:
                items[index].similar += 1
                continue
            seen_keys[prediction.text_key] = len(items)
            item = ReviewItem.model_validate(prediction, from_attributes=True)
            item.drift_score = drift_score
            items.append(item)
            held.append(holder is not None and holder != principal)
        return [item for item, other in zip(items, held, strict=True) if not other][:limit]

    def item(self, prediction_id: str, principal: str, now: datetime | None = None) -> ReviewItem | None:
        """``prediction_id`` as a review item while the queue would still offer its text to ``principal``."""
        now = now or utcnow()
        with self.database.read_session() as session:
            found = session.exec(
                select(Prediction, DriftTarget.drift_score)
                .outerjoin(DriftTarget, col(DriftTarget.prediction_id) == col(Prediction.prediction_id))
                .where(col(Prediction.prediction_id) == prediction_id, *self._open(now, principal))
            ).first()
        if found is None:
            return None
        item = ReviewItem.model_validate(found[0], from_attributes=True)
        item.drift_score = found[1]
        return item

    def remaining(self, principal: str, now: datetime | None = None) -> int:
        """Texts still open to ``principal`` (near-duplicates not collapsed: an upper bound of ``next``'s items)."""
        now = now or utcnow()
        leased_to_others = exists().where(
            col(DeskLease.text_key) == col(Prediction.text_key),
            col(DeskLease.expires_at) > now,
            col(DeskLease.principal) != principal,
        )
        with self.database.read_session() as session:
            query = select(func.count(func.distinct(Prediction.text_key))).where(
                *self._open(now, principal), ~leased_to_others
            )
            return int(session.exec(query).one())

    def _open(self, now: datetime, principal: str | None) -> list[Any]:
        """Conditions on ``Prediction`` of the texts the queue may offer: recent, unlabeled, not skipped."""
        labeled = exists().where(
            and_(
                col(Feedback.text_key) == col(Prediction.text_key),
                col(Feedback.status) != FeedbackStatus.REJECTED,
            )
        )
        conditions: list[Any] = [col(Prediction.created_at) >= now - self.window, ~labeled]
        if principal is not None:
            skipped = exists().where(
                col(DeskEntry.principal) == principal,
                col(DeskEntry.text_key) == col(Prediction.text_key),
                col(DeskEntry.action) == DeskAction.SKIP,
            )
            conditions.append(~skipped)
        return conditions
