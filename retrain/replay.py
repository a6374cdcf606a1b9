"""Replay: logged traffic scored with a candidate version, compared with what was served, before anyone promotes it.

The window is read newest first and de-duplicated by text, so a text sent a thousand times counts once and the
scoring cost is bounded by ``limit`` texts however busy the window was. Labels people gave on those texts (accepted
or used) judge both sides where they exist.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import and_, func, or_
from sqlmodel import col, select
from tqdm.auto import tqdm

from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.models.feedback import Feedback, FeedbackStatus, Prediction
from flywheel.registry import ModelRegistry
from retrain.replay_report import (
    Agreement,
    ConfidenceChange,
    ConfusionCell,
    Disagreement,
    FeedbackCheck,
    LabelShift,
    ReplayResult,
    ReplayWindow,
)

__all__ = ["Replay", "ReplayError", "ReplayResult", "parse_since", "wilson"]

logger = logging.getLogger(__name__)

#: Predictions read per query while collecting distinct texts (keyset pages keep memory flat).
_PAGE = 5_000
#: Texts per call to the classifier: the progress bar moves once per chunk.
_CHUNK = 256
#: Ids or keys per IN list when reading feedback (keeps parameter lists small on both databases).
_IN_CHUNK = 500
#: Characters of a text kept in the result: enough to recognise it, the prediction id finds the rest.
_TEXT_CHARS = 200
#: z of a two-sided 95% interval.
_Z95 = 1.959964
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([mhdw])", re.IGNORECASE)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class ReplayError(FlywheelError):
    """A replay that cannot run as asked: a bad window, or no traffic in it."""


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """The start of a window: ``90m``, ``24h``, ``7d``, ``2w`` before ``now``, or an ISO timestamp (UTC if it names
    no zone)."""
    now = now or utcnow()
    text = value.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        amount = float(duration.group(1))
        if amount <= 0:
            raise ReplayError(f"--since {value!r} is an empty window; give a positive span such as 24h")
        return now - timedelta(**{_UNITS[duration.group(2).lower()]: amount})
    try:
        start = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(
            f"--since {value!r} is neither a span nor a time: use 90m, 24h, 7d, 2w or an ISO timestamp such as "
            "2024-05-01T08:00:00Z"
        ) from None
    start = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
    if start >= now:
        raise ReplayError(f"--since {value!r} is not in the past (now is {now:%Y-%m-%d %H:%M:%S} UTC)")
    return start


def wilson(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sound at 0% and 100% and for small ``n``, unlike p ± z·se."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


class Replay:
    """Scores the predictions logged in a window with a registry version and compares the two."""

    def __init__(self, database: Database, registry: ModelRegistry, *, progress: bool = True) -> None:
        self.database = database
        self.registry = registry
        self.progress = progress

    def run(
        self,
        version: str,
        since: datetime,
        *,
        limit: int,
        top: int,
        served_by: str | None = None,
        now: datetime | None = None,
    ) -> ReplayResult:
        """Replay the window from ``since`` to ``now`` (at most ``limit`` distinct texts, newest first) with
        ``version``; ``served_by`` keeps only what that version served."""
        now = now or utcnow()
        entry = self.registry.get(version)
        rows, in_window, read = self._window(since, now, limit, served_by)
        classifier = Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=entry.version)
        probs = self._score(classifier, [row.text for row in rows], entry.version)
        labels = classifier.labels
        predicted = [labels[i] for i in probs.argmax(axis=1)]
        window = ReplayWindow(
            since=since,
            until=now,
            served_by_filter=served_by,
            predictions=in_window,
            texts=len(rows),
            limit=limit,
            limited=len(rows) >= limit and read < in_window,
            served_by=dict(Counter(row.model_version for row in rows).most_common()),
        )
        agreed = sum(row.label == label for row, label in zip(rows, predicted, strict=True))
        low, high = wilson(agreed, len(rows))
        candidate_confidence = probs.max(axis=1)
        return ReplayResult(
            candidate=entry.version,
            candidate_labels=labels,
            window=window,
            agreement=Agreement(agreed=agreed, texts=len(rows), rate=agreed / len(rows), low=low, high=high),
            labels=_shifts(rows, predicted, labels),
            confusion=_confusion(rows, predicted, top),
            confidence=ConfidenceChange(
                logged=float(np.mean([row.confidence for row in rows])),
                candidate=float(candidate_confidence.mean()),
            ),
            disagreements=_disagreements(rows, probs, labels, top),
            feedback=self._feedback(rows, predicted, entry.version),
        )

    def _window(
        self, since: datetime, now: datetime, limit: int, served_by: str | None
    ) -> tuple[list[Prediction], int, int]:
        """The newest prediction of each distinct text (at most ``limit``), the predictions in the window, and how
        many of them were read to find those texts."""
        conditions = [col(Prediction.created_at) >= since, col(Prediction.created_at) <= now]
        if served_by is not None:
            conditions.append(col(Prediction.model_version) == served_by)
        order = (col(Prediction.created_at).desc(), col(Prediction.prediction_id).desc())
        newest: dict[str, Prediction] = {}
        read = 0
        with self.database.read_session() as session:
            in_window = session.exec(select(func.count()).select_from(Prediction).where(*conditions)).one()
            if not in_window:
                raise ReplayError(self._empty(since, served_by))
            cursor: Prediction | None = None
            while len(newest) < limit:
                query = select(Prediction).where(*conditions)
                if cursor is not None:
                    query = query.where(
                        or_(
                            col(Prediction.created_at) < cursor.created_at,
                            and_(
                                col(Prediction.created_at) == cursor.created_at,
                                col(Prediction.prediction_id) < cursor.prediction_id,
                            ),
                        )
                    )
                page = session.exec(query.order_by(*order).limit(_PAGE)).all()
                for row in page:
                    read += 1
                    newest.setdefault(row.text_key, row)
                    if len(newest) >= limit:
                        break
                if len(page) < _PAGE:
                    break
                cursor = page[-1]
        logger.info("replaying %d distinct texts of %d predictions since %s", len(newest), in_window, since)
        return list(newest.values()), int(in_window), read

    def _empty(self, since: datetime, served_by: str | None) -> str:
        """Why the window is empty, with the newest prediction there is, and how to widen the window."""
        query = select(func.max(Prediction.created_at))
        if served_by is not None:
            query = query.where(col(Prediction.model_version) == served_by)
        with self.database.read_session() as session:
            newest = session.exec(query).one()
        served = f" served by {served_by}" if served_by else ""
        if newest is None:
            return f"no predictions{served} are stored at all: send traffic (POST /predict) and run `flywheel ingest`"
        hint = " or drop --served-by" if served_by else ""
        return (
            f"no predictions{served} logged since {since:%Y-%m-%d %H:%M:%S} UTC; the newest is from "
            f"{newest:%Y-%m-%d %H:%M:%S} UTC: widen the window with --since (e.g. 7d, or an ISO timestamp){hint}"
        )

    def _score(self, classifier: Classifier, texts: Sequence[str], version: str) -> np.ndarray:
        """The candidate's probabilities of ``texts``, in order, with a progress bar over the chunks."""
        chunks = []
        with tqdm(total=len(texts), desc=f"scoring with {version}", unit="text", disable=not self.progress) as bar:
            for start in range(0, len(texts), _CHUNK):
                chunk = list(texts[start : start + _CHUNK])
                chunks.append(classifier.predict_proba(chunk).probs)
                bar.update(len(chunk))
        return np.concatenate(chunks)

    def _feedback(self, rows: Sequence[Prediction], predicted: Sequence[str], version: str) -> FeedbackCheck | None:
        """Both sides' accuracy on the texts people labelled (accepted or used labels), None when nobody did."""
        keys = [row.text_key for row in rows]
        key_of = {row.prediction_id: row.text_key for row in rows}
        labels: dict[str, Counter[str]] = {}
        trained: set[str] = set()
        statuses = (FeedbackStatus.ACCEPTED, FeedbackStatus.USED)
        with self.database.read_session() as session:
            for start in range(0, len(keys), _IN_CHUNK):
                chunk_keys = keys[start : start + _IN_CHUNK]
                chunk_ids = [row.prediction_id for row in rows[start : start + _IN_CHUNK]]
                query = select(
                    col(Feedback.text_key), col(Feedback.prediction_id), Feedback.label, col(Feedback.used_by_version)
                ).where(
                    col(Feedback.status).in_(statuses),
                    or_(col(Feedback.text_key).in_(chunk_keys), col(Feedback.prediction_id).in_(chunk_ids)),
                )
                for text_key, prediction_id, label, used_by in session.exec(query):
                    key = key_of.get(prediction_id or "", text_key)
                    if key is None:
                        continue
                    labels.setdefault(key, Counter())[label] += 1
                    if used_by == version:
                        trained.add(key)
        if not labels:
            return None
        truth: dict[str, str] = {}
        for key, counts in labels.items():
            (first, n), *rest = counts.most_common(2)
            # People who disagree about a text cannot say which model is right about it.
            if not rest or rest[0][1] < n:
                truth[key] = first
        logged = candidate = 0
        for row, label in zip(rows, predicted, strict=True):
            if row.text_key in truth:
                logged += row.label == truth[row.text_key]
                candidate += label == truth[row.text_key]
        return FeedbackCheck(
            labelled=len(truth),
            conflicting=len(labels) - len(truth),
            trained_candidate=len(trained & truth.keys()),
            logged_correct=logged,
            candidate_correct=candidate,
        )


def _shifts(rows: Sequence[Prediction], predicted: Sequence[str], labels: Sequence[str]) -> list[LabelShift]:
    """Every label either side uses or knows: its share of the window as logged and as the candidate labels it."""
    logged = Counter(row.label for row in rows)
    ours = Counter(predicted)
    known = {name for row in rows for name in row.scores} | set(logged)
    order = [*labels, *sorted(known - set(labels))]
    n = len(rows)
    return [
        LabelShift(
            label=name,
            logged=logged[name],
            candidate=ours[name],
            logged_share=logged[name] / n,
            candidate_share=ours[name] / n,
            logged_model_has=name in known,
            candidate_has=name in labels,
        )
        for name in order
    ]


def _confusion(rows: Sequence[Prediction], predicted: Sequence[str], top: int) -> list[ConfusionCell]:
    """The most frequent changes of label, logged to candidate, with the share of the logged label they take."""
    logged = Counter(row.label for row in rows)
    changes = Counter((row.label, label) for row, label in zip(rows, predicted, strict=True) if row.label != label)
    cells = sorted(changes.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [
        ConfusionCell(logged=source, candidate=target, texts=count, share_of_logged=count / logged[source])
        for (source, target), count in cells
    ]


def _disagreements(
    rows: Sequence[Prediction], probs: np.ndarray, labels: Sequence[str], top: int
) -> list[Disagreement]:
    """The texts where both sides are surest of different labels: each one's confidence in its own label,
    multiplied (a confident model overruled by a confident candidate comes first)."""
    found = []
    for row, scores in zip(rows, probs, strict=True):
        index = int(scores.argmax())
        if labels[index] == row.label:
            continue
        candidate_scores = dict(zip(labels, scores.tolist(), strict=True))
        swing = max(
            abs(candidate_scores.get(name, 0.0) - row.scores.get(name, 0.0))
            for name in {*candidate_scores, *row.scores}
        )
        found.append(
            Disagreement(
                prediction_id=row.prediction_id,
                text=row.text[:_TEXT_CHARS],
                created_at=row.created_at,
                served_by=row.model_version,
                logged_label=row.label,
                logged_confidence=row.confidence,
                candidate_label=labels[index],
                candidate_confidence=float(scores[index]),
                swing=swing,
            )
        )
    found.sort(key=lambda item: (-item.strength, -item.swing, item.prediction_id))
    return found[:top]
