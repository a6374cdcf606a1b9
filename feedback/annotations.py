"""Annotation files: reading ``text,label`` files from annotation teams and exporting feedback as CSV."""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from flywheel.errors import FlywheelError
from flywheel.models.feedback import FeedbackPublic

EXPORT_COLUMNS = (
    "text",
    "label",
    "source",
    "status",
    "status_reason",
    "feedback_id",
    "prediction_id",
    "created_at",
    "model_label",
    "label_quality",
    "label_issue",
    "conflict",
    "used_by_version",
)
#: Problems listed in full before the rest are only counted.
SHOWN_PROBLEMS = 10


class AnnotationFileError(FlywheelError):
    """An annotation file cannot be read at all."""


@dataclass
class Annotations:
    """The usable rows of an annotation file and what was wrong with the others."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Where each of ``rows`` is in the file ("line 3", "row 2"), for problems found later.
    where: list[str] = field(default_factory=list)

    def keep_labels(self, allowed: Collection[str]) -> None:
        """Move the rows whose label is not ``allowed`` to the problems."""
        known = set(allowed)
        kept = [(row, where) for row, where in zip(self.rows, self.where, strict=True) if row[1] in known]
        self.problems.extend(
            f"{where}: unknown label {label!r} (known: {', '.join(sorted(known))})"
            for (_, label), where in zip(self.rows, self.where, strict=True)
            if label not in known
        )
        self.rows, self.where = [row for row, _ in kept], [where for _, where in kept]

    def summary(self) -> str:
        """The problems, a few in full."""
        shown = "; ".join(self.problems[:SHOWN_PROBLEMS])
        more = len(self.problems) - SHOWN_PROBLEMS
        return shown + (f"; and {more} more" if more > 0 else "")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """``(line, record or None, problem)`` for each row of a CSV or JSON-lines file."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as handle:
        if suffix == ".csv":
            for record in csv.DictReader(handle):
                yield 0, record, ""
        elif suffix in (".jsonl", ".json", ".ndjson"):
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, None, f"line {number}: not JSON ({exc.msg})"
                    continue
                if not isinstance(record, dict):
                    yield number, None, f"line {number}: not a JSON object"
                    continue
                yield number, record, ""
        else:
            raise AnnotationFileError(f"unsupported annotation file {path.name!r}: use .csv or .jsonl")


def read_annotations(
    path: Path, text_column: str, label_column: str, labels: Iterable[str] | None, max_chars: int
) -> Annotations:
    """Read ``path``; rows with a blank, over-long or unknown-labeled text are reported, not imported."""
    if not path.is_file():
        raise AnnotationFileError(f"annotation file not found: {path}")
    allowed = set(labels) if labels is not None else None
    result = Annotations()
    try:
        for index, (line, record, problem) in enumerate(_records(path), start=1):
            where = f"line {line}" if line else f"row {index}"
            if record is None:
                result.problems.append(problem)
                continue
            missing = [name for name in (text_column, label_column) if name not in record]
            if missing:
                if index == 1 and path.suffix.lower() == ".csv":
                    raise AnnotationFileError(
                        f"{path} has no column {', '.join(map(repr, missing))}; found {list(record)} "
                        "(set FLYWHEEL_TEXT_COLUMN / FLYWHEEL_LABEL_COLUMN to use other names)"
                    )
                result.problems.append(f"{where}: missing {', '.join(missing)}")
                continue
            text, label = record[text_column], record[label_column]
            if not isinstance(text, str) or not isinstance(label, str):
                result.problems.append(f"{where}: text and label must be strings")
                continue
            text, label = text.strip(), label.strip()
            if not text:
                result.problems.append(f"{where}: blank text")
            elif len(text) > max_chars:
                result.problems.append(f"{where}: text of {len(text)} characters is over the {max_chars} limit")
            elif allowed is not None and label not in allowed:
                result.problems.append(f"{where}: unknown label {label!r} (known: {', '.join(sorted(allowed))})")
            else:
                result.rows.append((text, label))
                result.where.append(where)
    except UnicodeDecodeError as exc:
        raise AnnotationFileError(f"{path} is not valid UTF-8 (byte {exc.start}): re-save it as UTF-8") from exc
    except csv.Error as exc:
        raise AnnotationFileError(f"cannot parse {path} as CSV: {exc}") from exc
    return result


def write_export(rows: Iterable[FeedbackPublic], stream: TextIO) -> int:
    """Write feedback as CSV (``EXPORT_COLUMNS``); returns the number of rows."""
    writer = csv.writer(stream)
    writer.writerow(EXPORT_COLUMNS)
    count = 0
    for row in rows:
        data = row.model_dump(mode="json")
        writer.writerow(["" if data.get(column) is None else data[column] for column in EXPORT_COLUMNS])
        count += 1
    return count
