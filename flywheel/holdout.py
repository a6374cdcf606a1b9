"""Stratified splits and the golden holdout that every model is evaluated on."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from pydantic import BaseModel
from sklearn.model_selection import train_test_split

from flywheel.errors import DatasetError
from flywheel.storage import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 over the ``text``/``label`` rows, independent of index and extra columns."""
    digest = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"], strict=True):
        digest.update(f"{text}\t{label}\n".encode())
    return digest.hexdigest()


def stratified_split(
    frame: pd.DataFrame, fraction: float, seed: int, purpose: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off ``fraction`` of the rows with the label shares kept; (rest, split_off)."""
    counts = frame["label"].value_counts()
    n_split = max(round(len(frame) * fraction), len(counts))
    if counts.min() < 2 or n_split >= len(frame):
        raise DatasetError(
            f"too few rows for a stratified {purpose} split: {len(frame)} rows, smallest class "
            f"{counts.idxmin()!r} has {counts.min()}; add data (at least 2 rows per label)"
        )
    rest, split_off = train_test_split(frame, test_size=n_split, random_state=seed, stratify=frame["label"])
    return rest.reset_index(drop=True), split_off.reset_index(drop=True)


class HoldoutInfo(BaseModel):
    """What identifies the golden holdout."""

    sha256: str
    rows: int
    labels: list[str]
    created_at: datetime


class GoldenHoldout:
    """The frozen test split, persisted with a content hash in the state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data_path = directory / "golden.parquet"
        self.info_path = directory / "golden.json"

    def exists(self) -> bool:
        """Whether a holdout has been frozen."""
        return self.info_path.is_file() and self.data_path.is_file()

    def info(self) -> HoldoutInfo:
        """The stored hash, size and labels."""
        if not self.exists():
            raise DatasetError(f"no golden holdout in {self.directory}: train a first model to create it")
        return HoldoutInfo.model_validate_json(self.info_path.read_text())

    def load(self) -> pd.DataFrame:
        """The holdout rows, verified against their hash."""
        info = self.info()
        frame = pd.read_parquet(self.data_path)
        if content_hash(frame) != info.sha256:
            raise DatasetError(
                f"golden holdout {self.data_path} does not match its hash {info.sha256[:12]}: "
                "it was modified; restore it or start a new state directory"
            )
        return frame

    def freeze(self, frame: pd.DataFrame) -> HoldoutInfo:
        """Persist ``frame`` as the holdout (atomically) and return its info."""
        rows = frame[["text", "label"]].reset_index(drop=True)
        info = HoldoutInfo(
            sha256=content_hash(rows),
            rows=len(rows),
            labels=sorted(rows["label"].unique().tolist()),
            created_at=datetime.now(UTC),
        )
        atomic_write(self.data_path, lambda p: rows.to_parquet(p, index=False))
        atomic_write_text(self.info_path, info.model_dump_json(indent=2))
        logger.info("froze golden holdout: %d rows, sha256 %s", info.rows, info.sha256[:12])
        return info

