"""Loading labeled text datasets from CSV, JSONL and Parquet files."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from flywheel.errors import DatasetError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def load_dataset(path: Path | str, text_column: str = "text", label_column: str = "label") -> pd.DataFrame:
    """Read a labeled file into a frame with exactly the columns ``text`` and ``label`` (strings)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(
            f"unsupported dataset format {path.suffix!r} for {path}: use .csv, .jsonl or .parquet"
        )
    try:
        if kind == "csv":
            frame = pd.read_csv(path, encoding="utf-8", dtype=str, keep_default_na=False)
        elif kind == "jsonl":
            frame = pd.read_json(path, lines=True, encoding="utf-8", dtype=False)
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid UTF-8 (byte {exc.start}): re-save it as UTF-8 and try again"
        ) from exc
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DatasetError(f"cannot parse {path} as {kind}: {str(exc).splitlines()[0]}") from exc
    missing = [column for column in (text_column, label_column) if column not in frame.columns]
    if missing:
        raise DatasetError(
            f"{path} has no column {', '.join(repr(m) for m in missing)}; found {list(frame.columns)} "
            "(set FLYWHEEL_TEXT_COLUMN / FLYWHEEL_LABEL_COLUMN to use other names)"
        )
    frame = frame[[text_column, label_column]].rename(columns={text_column: "text", label_column: "label"})
    # Missing cells become empty strings so the quality pipeline counts them as empty rows.
    frame = frame.fillna("").astype(str)
    logger.info("loaded %d rows from %s", len(frame), path)
    return frame.reset_index(drop=True)
