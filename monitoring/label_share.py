"""Label shares: each predicted label's share of the current window against its share of the reference, the
label-share alerts that raises, and the shares of the stored predictions hour by hour.

A departure counts only when it is large in absolute terms (``FLYWHEEL_DRIFT_LABEL_SHARE_MAX_DIFF``) and large
for the window's size (``FLYWHEEL_DRIFT_LABEL_SHARE_MIN_Z`` standard errors of the reference share,
``sqrt(p(1-p)/n)``): the first keeps a big window's small but real moves quiet, the second a small window's noise.
Both sides are the champion's own predictions (on the reference's training rows, and on the window's traffic it
served), so its errors do not read as a shift. Labels are whatever the model and the predictions name: any number.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
from pydantic import BaseModel, Field
from sqlalchemy.orm import Mapped
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, func, select

from flywheel.database import Database
from flywheel.events import AlertEvent, AlertKind
from flywheel.models.feedback import Prediction
from monitoring.errors import MonitoringError

#: Example texts an alert carries, and the characters kept of each: enough to recognise the traffic, no more.
EXAMPLE_TEXTS = 3
EXAMPLE_CHARS = 280


class LabelShare(BaseModel):
    """One label's share of the window's predictions and of the reference's, and whether it shifted."""

    label: str
    reference_share: float
    current_share: float
    current_count: int
    #: Standard errors of the reference share (for the window's size) between the two shares; signed.
    z_score: float
    shifted: bool
    #: Newest window texts predicted as this label (for shifted labels only).
    examples: list[str] = Field(default_factory=list)
    alert_event_id: str | None = None


class LabelShareCheck(BaseModel):
    """The label-share comparison of one drift report."""

    max_diff: float
    min_z: float
    current_rows: int = 0
    reference_rows: int = 0
    shares: list[LabelShare] = Field(default_factory=list)
    #: Why no label was compared (too few served predictions), or None.
    skipped: str | None = None

    @property
    def shifted(self) -> list[LabelShare]:
        """The labels whose share departed from the reference by both bounds."""
        return [share for share in self.shares if share.shifted]

    def describe(self) -> str:
        """One line naming the shifted labels, or an empty string when none shifted."""
        moves = [f"{s.label} {s.reference_share:.2f} → {s.current_share:.2f}" for s in self.shifted]
        return f"label share shifted: {', '.join(moves)}" if moves else ""


def compare_label_shares(
    reference: Sequence[str],
    current: pd.DataFrame,
    labels: Sequence[str],
    *,
    max_diff: float,
    min_z: float,
    min_rows: int,
) -> LabelShareCheck:
    """Compare the predicted labels of ``current`` (columns ``predicted`` and ``text``, oldest row first) with
    those of ``reference``, for ``labels`` and any other label either side predicted."""
    check = LabelShareCheck(max_diff=max_diff, min_z=min_z, current_rows=len(current), reference_rows=len(reference))
    if len(reference) == 0:
        check.skipped = "the reference has no predictions"
        return check
    if len(current) < min_rows:
        check.skipped = (
            f"{len(current)} predictions of the serving model in the window, at least {min_rows} are needed "
            "(FLYWHEEL_DRIFT_MIN_ROWS)"
        )
        return check
    predicted = current["predicted"].astype(str)
    reference_counts = Counter(str(label) for label in reference)
    current_counts = Counter(predicted)
    extra = sorted((set(reference_counts) | set(current_counts)) - set(labels))
    n, n_ref = len(current), len(reference)
    # A label the reference never (or always) predicted has no spread: half a count keeps its error finite.
    floor = 0.5 / n_ref
    for label in [*labels, *extra]:
        p_ref = reference_counts[label] / n_ref
        p_cur = current_counts[label] / n
        p = min(max(p_ref, floor), 1 - floor)
        z = (p_cur - p_ref) / math.sqrt(p * (1 - p) / n)
        shifted = abs(p_cur - p_ref) > max_diff and abs(z) > min_z
        examples: list[str] = []
        if shifted:
            texts = current["text"][predicted == label].astype(str).tolist()[::-1][:EXAMPLE_TEXTS]
            examples = [_cut(text) for text in texts]
        check.shares.append(
            LabelShare(
                label=label,
                reference_share=round(p_ref, 6),
                current_share=round(p_cur, 6),
                current_count=current_counts[label],
                z_score=round(z, 3),
                shifted=shifted,
                examples=examples,
            )
        )
    return check


def _cut(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 1] + "…"


def label_share_alerts(report_id: str, model_version: str, check: LabelShareCheck) -> list[AlertEvent]:
    """One ``label_share`` alert per shifted label of ``check``."""
    return [
        AlertEvent(
            kind=AlertKind.LABEL_SHARE,
            report_id=report_id,
            model_version=model_version,
            current_rows=check.current_rows,
            reference_rows=check.reference_rows,
            label=share.label,
            current_share=share.current_share,
            reference_share=share.reference_share,
            z_score=share.z_score,
            examples=share.examples,
        )
        for share in check.shifted
    ]


@dataclass(frozen=True)
class HourlyCount:
    """How many stored predictions of one hour (UTC, its start) had one label."""

    hour: datetime
    label: str
    count: int


def hourly_label_counts(database: Database, start: datetime, end: datetime) -> list[HourlyCount]:
    """Predictions logged from ``start`` up to ``end``, counted by hour and label, oldest hour first.

    Counted by the database (one grouped query over the indexed ``created_at``), so the rows never leave it.
    """
    hour = _hour_of(col(Prediction.created_at), database.engine.dialect.name)
    query = (
        select(hour, Prediction.label, func.count())
        .where(col(Prediction.created_at) >= start, col(Prediction.created_at) < end)
        .group_by(hour, Prediction.label)
        .order_by(hour, Prediction.label)
    )
    with database.read_session() as session:
        rows = session.exec(query).all()
    return [HourlyCount(hour=_as_utc(value), label=label, count=int(count)) for value, label, count in rows]


def _hour_of(created_at: Mapped[datetime], dialect: str) -> ColumnElement[object]:
    if dialect == "sqlite":
        # SQLite keeps naive UTC text (``UTCDateTime``): cut it at the hour.
        return func.strftime("%Y-%m-%d %H:00:00", created_at)
    if dialect == "postgresql":
        # In UTC, not the session's time zone, which may be offset by a part of an hour.
        return func.date_trunc("hour", func.timezone("UTC", created_at))
    raise MonitoringError(f"label shares by hour need SQLite or PostgreSQL, not {dialect}")


def _as_utc(value: object) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
