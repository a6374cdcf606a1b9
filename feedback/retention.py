"""How long prediction texts are kept, and forgetting one client on request.

Housekeeping deletes predictions older than ``FLYWHEEL_RETENTION_DAYS`` unless feedback refers to them (labelled
predictions are training data and stay as long as their labels). ``forget`` removes one client's predictions,
the feedback on them, and its events still waiting in spill files that no running process holds, and records in
the audit log that it happened. What it cannot reach: events already in Kafka (they live for the topic's
retention) and spill files a running process holds (those are delivered, then ingested, later: run it again).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, exists
from sqlmodel import Session, col, select

from flywheel.access import AuditLog
from flywheel.database import Database
from flywheel.events import Topic, utcnow
from flywheel.models.deployment import ShadowPrediction
from flywheel.models.desk import DeskEntry, DeskLease
from flywheel.models.drift import DriftTarget
from flywheel.models.feedback import Feedback, Prediction
from flywheel.spill import Record, SpillFile

logger = logging.getLogger(__name__)

#: Predictions deleted per statement, so housekeeping never holds a long write lock.
_BATCH = 1000


@dataclass(frozen=True)
class Forgotten:
    """What ``forget`` removed, and what it could not reach."""

    predictions: int
    feedback: int
    spilled_events: int
    held_spill_files: int


def expire_predictions(database: Database, days: float, now: datetime | None = None) -> int:
    """Delete unlabelled predictions (and their drift targets) older than ``days``; returns how many went."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    labelled = exists().where(col(Feedback.prediction_id) == col(Prediction.prediction_id))
    total = 0
    while True:
        with database.session() as session:
            ids = list(
                session.exec(
                    select(Prediction.prediction_id)
                    .where(col(Prediction.created_at) < cutoff, ~labelled)
                    .limit(_BATCH)
                )
            )
            if not ids:
                break
            _delete_predictions(session, ids)
        total += len(ids)
    if total:
        logger.info("retention: deleted %d predictions older than %g days", total, days)
    return total


def _delete_predictions(session: Session, ids: list[str]) -> None:
    """Delete predictions ``ids`` with the rows that point at them: drift targets, desk leases and entries, shadows."""
    for table in (DriftTarget, DeskLease, DeskEntry, ShadowPrediction):
        session.execute(delete(table).where(col(table.prediction_id).in_(ids)))
    session.execute(delete(Prediction).where(col(Prediction.prediction_id).in_(ids)))


def forget_client(database: Database, home: Path, client_id: str, actor: str) -> Forgotten:
    """Remove everything stored about ``client_id`` (see the module docstring for what stays out of reach)."""
    with database.session() as session:
        ids = list(session.exec(select(Prediction.prediction_id).where(col(Prediction.client_id) == client_id)))
        feedback = 0
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            result = session.execute(delete(Feedback).where(col(Feedback.prediction_id).in_(chunk)))
            feedback += int(getattr(result, "rowcount", 0) or 0)
            _delete_predictions(session, chunk)
    spilled, held = _forget_spilled(home / "spill", client_id)
    forgotten = Forgotten(len(ids), feedback, spilled, held)
    AuditLog(database).record(
        actor,
        "client.forget",
        client_id,
        predictions=forgotten.predictions,
        feedback=forgotten.feedback,
        spilled_events=forgotten.spilled_events,
        held_spill_files=forgotten.held_spill_files,
    )
    return forgotten


def _forget_spilled(directory: Path, client_id: str) -> tuple[int, int]:
    """Drop the client's prediction events from every spill file nobody holds; count the ones held."""
    removed = held = 0
    for path in sorted(directory.glob("*.spill")) if directory.exists() else []:
        spill = SpillFile.adopt(path)
        if spill is None:
            held += 1
            continue
        try:
            removed += _rewrite(spill, client_id)
        finally:
            spill.close()
    return removed, held


def _rewrite(spill: SpillFile, client_id: str) -> int:
    with open(spill.path, "rb") as handle:
        handle.seek(spill.offset)
        lines = handle.read().splitlines(keepends=True)
    kept = [line for line in lines if not _belongs_to(line, client_id)]
    if len(kept) == len(lines):
        return 0
    # Only the part not yet replayed matters; the rewritten file starts there, with its offset back at zero.
    tmp = spill.path.with_name(f".{spill.path.name}.forget")
    with open(tmp, "wb") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    # The offset restarts first: a crash before the swap replays the old file from its top (duplicates, which
    # ingestion ignores), never skips part of the new one.
    spill.advance(0)
    os.replace(tmp, spill.path)
    return len(lines) - len(kept)


def _belongs_to(line: bytes, client_id: str) -> bool:
    try:
        record = Record.parse(line.rstrip(b"\n"))
        return record.topic == Topic.PREDICTIONS and json.loads(record.payload).get("client_id") == client_id
    except (ValueError, json.JSONDecodeError):
        return False
