"""Stored drift embeddings: read them for a window, and fill them in the background of the ingestion process.

The ingestor stores a batch of predictions first, then hands the batch to ``PredictionEmbedder.offer`` (it never
blocks: a full queue drops the offer), and a supervised thread embeds and stores them with the drift encoder.
Ingestion throughput thus never waits for the model, and a failing encoder costs no prediction: the rows stay in
the store without an embedding. A periodic sweep embeds the rows of the drift window that still lack one (dropped
offers, failures, rows another process stored, a new encoder), newest first, and a drift report embeds whatever
is still missing itself. Inserts ignore rows already there, so two processes filling the same rows is harmless.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import and_, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlmodel import col, select

from flywheel.database import Database
from flywheel.encoder import DriftEncoder, to_bytes
from flywheel.events import utcnow
from flywheel.models.drift import PredictionEmbedding
from flywheel.models.feedback import Prediction
from flywheel.settings import Settings
from flywheel.supervision import Supervised, describe

logger = logging.getLogger(__name__)

#: Predictions waiting in memory for the embedder; beyond it offers are dropped (the sweep finds them later).
QUEUE_ROWS = 20_000
#: Seconds between sweeps for window rows without an embedding, and the wait while the database is away.
SWEEP_SECONDS = 60.0
#: Prediction ids per ``IN (...)`` query, well under every database's bound-parameter limit.
_CHUNK = 900
_TRANSIENT = (OperationalError, InterfaceError)


def stored_embeddings(database: Database, encoder_id: str, prediction_ids: Sequence[str]) -> dict[str, bytes]:
    """The stored vectors of ``encoder_id`` for those of ``prediction_ids`` that have one."""
    found: dict[str, bytes] = {}
    with database.read_session() as session:
        for start in range(0, len(prediction_ids), _CHUNK):
            rows = session.exec(
                select(PredictionEmbedding.prediction_id, PredictionEmbedding.vector).where(
                    col(PredictionEmbedding.encoder) == encoder_id,
                    col(PredictionEmbedding.prediction_id).in_(prediction_ids[start : start + _CHUNK]),
                )
            )
            found.update((prediction_id, bytes(vector)) for prediction_id, vector in rows)
    return found


def store_embeddings(database: Database, encoder: DriftEncoder, ids: Sequence[str], vectors: Any) -> None:
    """Store one float16 row per prediction id; rows already stored are left as they are."""
    if not ids:
        return
    now = utcnow()
    rows = [
        {"prediction_id": pid, "encoder": encoder.encoder_id, "dims": encoder.dims, "vector": blob, "created_at": now}
        for pid, blob in zip(ids, to_bytes(vectors), strict=True)
    ]
    with database.session() as session:
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            statement: Any = postgresql.insert(PredictionEmbedding).on_conflict_do_nothing()
        elif dialect == "sqlite":
            statement = sqlite.insert(PredictionEmbedding).on_conflict_do_nothing()
        else:
            statement = insert(PredictionEmbedding)
        session.connection().execute(statement, rows)


class PredictionEmbedder:
    """Embeds stored predictions with the drift encoder on a supervised thread named ``embed``."""

    def __init__(
        self, settings: Settings, database: Database, stop: threading.Event, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.database = database
        self._stop = stop
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue(QUEUE_ROWS)
        self._encoder: DriftEncoder | None = None
        #: Prediction ids whose text the encoder failed on alone; the sweep skips them (a report embeds them).
        self._failed: set[str] = set()
        self._next_sweep = 0.0
        self.embedded = Counter(
            "flywheel_drift_embedded", "Predictions embedded and stored by the drift embedder.", registry=registry
        )
        self.failures = Counter(
            "flywheel_drift_embed_failures", "Predictions the drift embedder could not embed.", registry=registry
        )
        self.dropped = Counter(
            "flywheel_drift_embed_dropped", "Offers dropped because the embed queue was full.", registry=registry
        )
        self.supervisor = Supervised("embed", self._work, stop, max_backoff=SWEEP_SECONDS, registry=registry)

    def start(self) -> PredictionEmbedder:
        """Start the thread; the encoder loads on it, so a slow or failing load never delays ingestion."""
        self.supervisor.start()
        return self

    def offer(self, rows: Iterable[dict[str, Any]]) -> None:
        """Queue stored prediction rows (``prediction_id``, ``text``) for embedding; never blocks."""
        for row in rows:
            try:
                self._queue.put_nowait((row["prediction_id"], row["text"]))
            except queue.Full:
                self.dropped.inc()

    def _work(self) -> None:
        if self._encoder is None:
            if self.settings.torch_threads:
                import torch

                # Only this thread uses torch in the ingestion process: the setting bounds what it takes from it.
                torch.set_num_threads(self.settings.torch_threads)
            self._encoder = DriftEncoder.load(self.settings)
        encoder = self._encoder
        while not self._stop.is_set():
            batch = self._take()
            if not batch and time.monotonic() >= self._next_sweep:
                try:
                    batch = self._missing(encoder)
                except _TRANSIENT as exc:
                    self.supervisor.fault(f"cannot read predictions to embed: {describe(exc)}")
                    self._stop.wait(min(SWEEP_SECONDS, 5.0))
                    continue
                # A full batch means more may be missing: sweep again right after it.
                self._next_sweep = 0.0 if len(batch) >= self.settings.drift_embed_batch_size else (
                    time.monotonic() + SWEEP_SECONDS
                )
            if batch:
                self._embed(encoder, batch)
            self.supervisor.recovered()

    def _take(self) -> list[tuple[str, str]]:
        """Up to one batch from the queue, waiting a moment for the first."""
        size = self.settings.drift_embed_batch_size
        try:
            batch = [self._queue.get(timeout=0.5)]
        except queue.Empty:
            return []
        while len(batch) < size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _missing(self, encoder: DriftEncoder) -> list[tuple[str, str]]:
        """Predictions of the drift window without an embedding of ``encoder``, newest first."""
        since = utcnow() - timedelta(hours=self.settings.drift_window_hours)
        statement = (
            select(Prediction.prediction_id, Prediction.text)
            .outerjoin(
                PredictionEmbedding,
                and_(
                    col(PredictionEmbedding.prediction_id) == col(Prediction.prediction_id),
                    col(PredictionEmbedding.encoder) == encoder.encoder_id,
                ),
            )
            .where(col(Prediction.created_at) >= since, col(PredictionEmbedding.prediction_id).is_(None))
            .order_by(col(Prediction.created_at).desc())
            .limit(self.settings.drift_embed_batch_size + len(self._failed))
        )
        with self.database.read_session() as session:
            rows = [(pid, text) for pid, text in session.exec(statement) if pid not in self._failed]
        return rows[: self.settings.drift_embed_batch_size]

    def _embed(self, encoder: DriftEncoder, batch: list[tuple[str, str]]) -> None:
        ids = [pid for pid, _ in batch]
        texts = [text for _, text in batch]
        try:
            vectors = encoder.embed(texts, batch_size=len(texts))
        except Exception as exc:  # noqa: BLE001 - one bad text must not stop the rest: they are tried alone
            logger.warning("drift embedding of %d texts failed (%s); embedding them one by one", len(texts), exc)
            self._embed_each(encoder, batch)
            return
        self._store(encoder, ids, vectors)

    def _embed_each(self, encoder: DriftEncoder, batch: list[tuple[str, str]]) -> None:
        for pid, text in batch:
            try:
                vectors = encoder.embed([text])
            except Exception as exc:  # noqa: BLE001 - the prediction stays stored; a drift report embeds it
                logger.warning("cannot embed prediction %s for drift: %s", pid, describe(exc))
                self.failures.inc()
                if len(self._failed) < QUEUE_ROWS:
                    self._failed.add(pid)
                continue
            self._store(encoder, [pid], vectors)

    def _store(self, encoder: DriftEncoder, ids: list[str], vectors: Any) -> None:
        while not self._stop.is_set():
            try:
                store_embeddings(self.database, encoder, ids, vectors)
            except IntegrityError as exc:
                # Housekeeping deleted one of the predictions meanwhile; the next sweep embeds the others.
                logger.info("embeddings of %d predictions not stored (%s); the sweep retries", len(ids), exc.orig)
                self._next_sweep = 0.0
                return
            except _TRANSIENT as exc:
                self.supervisor.fault(f"cannot store drift embeddings: {describe(exc)}")
                self._stop.wait(min(SWEEP_SECONDS, 5.0))
                continue
            self.embedded.inc(len(ids))
            return

