"""The drift reference of a model version: its training rows and its own predictions, cached, and their embeddings.

The rows and predictions belong to the version; the embeddings come from the one drift encoder through a cache of
its own (``monitoring.embeddings``), so every version's reference lies in the same space as the stored window.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from flywheel.classifier import Classifier
from flywheel.encoder import DriftEncoder
from flywheel.registry import ModelVersion
from flywheel.settings import Settings
from flywheel.storage import atomic_write, atomic_write_text, file_lock
from monitoring.embeddings import ReferenceEmbeddings
from monitoring.errors import MonitoringError

logger = logging.getLogger(__name__)

FRAME_FILE = "reference.parquet"
META_FILE = "reference.json"


class ReferenceMeta(BaseModel):
    """What a cached reference was built from; a mismatch means it is rebuilt."""

    version: str
    training_sha256: str
    max_rows: int
    seed: int
    rows: int
    training_rows: int
    build_seconds: float


@dataclass
class ReferenceSet:
    """Training texts with labels, the model's predicted label and confidence, and their drift-encoder embeddings."""

    meta: ReferenceMeta
    frame: pd.DataFrame
    embeddings: np.ndarray
    #: Reference texts this load had to embed (0 once the drift encoder's cache holds them all).
    embedded: int = 0

    @property
    def version(self) -> str:
        """The model version this reference belongs to."""
        return self.meta.version


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def predict_frame(classifier: Classifier, texts: list[str], batch_size: int) -> pd.DataFrame:
    """The classifier's predicted label and confidence for each text."""
    probs = classifier.predict_proba(texts, batch_size=batch_size).probs
    labels = np.asarray(classifier.labels, dtype=object)
    return pd.DataFrame({"predicted": labels[probs.argmax(axis=1)], "confidence": probs.max(axis=1).astype(float)})


class ReferenceCache:
    """Builds a version's reference once and keeps it under ``<home>/monitoring/reference/<version>``."""

    def __init__(self, settings: Settings, batch_size: int = 64) -> None:
        self.directory = settings.home / "monitoring" / "reference"
        self.max_rows = settings.drift_reference_max_rows
        self.seed = settings.seed
        self.batch_size = batch_size
        self.embeddings = ReferenceEmbeddings(settings.home, batch_size)

    def path(self, version: str) -> Path:
        """Directory of one version's cached reference."""
        return self.directory / version

    def load(self, entry: ModelVersion, classifier: Classifier, encoder: DriftEncoder) -> ReferenceSet:
        """The cached reference of ``entry`` (built by ``classifier`` if missing or stale), embedded by ``encoder``."""
        source = entry.training_data_path
        if not source.is_file():
            raise MonitoringError(
                f"model {entry.version} has no training data at {source}: the drift reference cannot be built; "
                "retrain the model or promote a version that has one"
            )
        sha = file_sha256(source)
        with self._locked(entry.version):
            cached = self._read(entry.version)
            if (
                cached is None
                or cached[0].training_sha256 != sha
                or cached[0].max_rows != self.max_rows
                or cached[0].seed != self.seed
            ):
                cached = self._build(entry, classifier, sha)
        meta, frame = cached
        embeddings, embedded = self.embeddings.embed(encoder, frame["text"].astype(str).tolist())
        return ReferenceSet(meta=meta, frame=frame, embeddings=embeddings, embedded=embedded)

    def _read(self, version: str) -> tuple[ReferenceMeta, pd.DataFrame] | None:
        directory = self.path(version)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            return None
        try:
            meta = ReferenceMeta.model_validate_json(meta_path.read_text())
            frame = pd.read_parquet(directory / FRAME_FILE)
        except (OSError, ValueError) as exc:
            logger.warning("cached drift reference of %s is unreadable (%s); rebuilding it", version, exc)
            return None
        if len(frame) != meta.rows:
            logger.warning("cached drift reference of %s is inconsistent; rebuilding it", version)
            return None
        return meta, frame

    def _build(self, entry: ModelVersion, classifier: Classifier, sha: str) -> tuple[ReferenceMeta, pd.DataFrame]:
        started = time.perf_counter()
        training = pd.read_parquet(entry.training_data_path)
        missing = {"text", "label"} - set(training.columns)
        if missing:
            raise MonitoringError(f"training data of model {entry.version} lacks columns {sorted(missing)}")
        sample = training
        if len(training) > self.max_rows:
            sample = training.sample(self.max_rows, random_state=self.seed)
        frame = sample[["text", "label"]].reset_index(drop=True).astype({"text": str, "label": str})
        texts = frame["text"].tolist()
        logger.info("building drift reference of %s: %d of %d training rows", entry.version, len(frame), len(training))
        predicted = predict_frame(classifier, texts, self.batch_size)
        frame = pd.concat([frame, predicted], axis=1)
        meta = ReferenceMeta(
            version=entry.version,
            training_sha256=sha,
            max_rows=self.max_rows,
            seed=self.seed,
            rows=len(frame),
            training_rows=len(training),
            build_seconds=round(time.perf_counter() - started, 3),
        )
        directory = self.path(entry.version)
        atomic_write(directory / FRAME_FILE, lambda p: frame.to_parquet(p, index=False))
        # The meta file is written last: its presence marks a complete cache entry.
        atomic_write_text(directory / META_FILE, json.dumps(meta.model_dump(), indent=2))
        logger.info("drift reference of %s built in %.1fs", entry.version, meta.build_seconds)
        return meta, frame

    def _locked(self, version: str) -> contextlib.AbstractContextManager[None]:
        # The scheduler and a manual `flywheel drift run` must not both predict 10,000 texts.
        return file_lock(self.directory / f".{version}.lock")

