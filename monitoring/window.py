"""The current window: the most recent logged predictions, the accepted feedback label and stored embedding of each."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pandas as pd
from sqlmodel import col, select

from flywheel.database import Database
from flywheel.embedding import stored_embeddings
from flywheel.events import utcnow
from flywheel.models.feedback import Feedback, FeedbackStatus, Prediction

#: Columns of a current-window frame; ``feedback_label`` holds accepted feedback or null.
WINDOW_COLUMNS = ["prediction_id", "text", "predicted", "confidence", "model_version", "created_at", "feedback_label"]
#: Prediction ids per ``IN (...)`` query, well under every database's bound-parameter limit.
_CHUNK = 900


@dataclass
class CurrentWindow:
    """Recent predictions to compare with the reference, and how they were chosen."""

    frame: pd.DataFrame
    rule: str
    start: datetime | None = None
    end: datetime | None = None
    #: Drift encoder whose stored embeddings were read (None: the window was not read from the store).
    encoder_id: str | None = None
    #: Stored float16 embeddings by prediction id; rows without one are embedded by the report.
    embeddings: dict[str, bytes] = field(default_factory=dict)


class WindowReader:
    """Reads windows from the feedback store's ``prediction`` and ``feedback`` tables."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def load(
        self, hours: float, max_rows: int, now: datetime | None = None, encoder_id: str | None = None
    ) -> CurrentWindow:
        """Predictions of the last ``hours`` hours, newest first, at most ``max_rows`` of them.

        With ``encoder_id``, the window also holds the embeddings that drift encoder stored for them.
        """
        end = now or utcnow()
        start = end - timedelta(hours=hours)
        with self.database.read_session() as session:
            predictions = list(
                session.exec(
                    select(Prediction)
                    .where(col(Prediction.created_at) >= start, col(Prediction.created_at) <= end)
                    .order_by(col(Prediction.created_at).desc())
                    .limit(max_rows)
                )
            )
            ids = [p.prediction_id for p in predictions]
            labels: dict[str, tuple[datetime, str]] = {}
            for i in range(0, len(ids), _CHUNK):
                rows = session.exec(
                    select(Feedback.prediction_id, Feedback.label, Feedback.updated_at).where(
                        col(Feedback.prediction_id).in_(ids[i : i + _CHUNK]),
                        col(Feedback.status).in_([FeedbackStatus.ACCEPTED, FeedbackStatus.USED]),
                    )
                )
                for prediction_id, label, updated in rows:
                    # Several sources may label one prediction: the latest accepted label counts.
                    if prediction_id and (prediction_id not in labels or labels[prediction_id][0] < updated):
                        labels[prediction_id] = (updated, label)
        frame = pd.DataFrame(
            {
                "prediction_id": ids,
                "text": [p.text for p in predictions],
                "predicted": [p.label for p in predictions],
                "confidence": [float(p.confidence) for p in predictions],
                "model_version": [p.model_version for p in predictions],
                "created_at": [p.created_at for p in predictions],
                "feedback_label": [labels[i][1] if i in labels else None for i in ids],
            },
            columns=WINDOW_COLUMNS,
        )
        rule = f"last {hours:g} h, newest {max_rows} at most"
        embeddings = stored_embeddings(self.database, encoder_id, ids) if encoder_id else {}
        return CurrentWindow(
            frame=frame.iloc[::-1].reset_index(drop=True),
            rule=rule,
            start=start,
            end=end,
            encoder_id=encoder_id,
            embeddings=embeddings,
        )
