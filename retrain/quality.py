"""The data-quality pipeline: normalise, drop bad rows, dedupe, resolve conflicting labels."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
from pydantic import BaseModel, Field

from flywheel.errors import DatasetError
from flywheel.text import dedupe_key, normalize_text
from retrain.augmentation import AugmentationReport

EXAMPLES_PER_REASON = 3


class DropReason(BaseModel):
    """How many rows one rule removed, with a few of their texts."""

    count: int = 0
    examples: list[str] = Field(default_factory=list)


class QualityReport(BaseModel):
    """What the pipeline did to a dataset; saved with every training run."""

    rows_in: int
    rows_out: int
    dropped: dict[str, DropReason] = Field(default_factory=dict)
    conflicts_resolved: int = 0
    class_balance: dict[str, int] = Field(default_factory=dict)
    imbalance_ratio: float = 1.0
    #: What augmentation added to the training split (after cleaning and splitting); None when it was off.
    augmentation: AugmentationReport | None = None

    def render(self) -> str:
        """Human-readable summary for the CLI."""
        lines = [f"data quality: {self.rows_in} rows in, {self.rows_out} rows out"]
        for reason, drop in self.dropped.items():
            shown = "; ".join(repr(e[:60]) for e in drop.examples)
            lines.append(f"  dropped {drop.count:>6} {reason}" + (f"  e.g. {shown}" if shown else ""))
        if self.conflicts_resolved:
            lines.append(f"  resolved {self.conflicts_resolved} conflicting texts by majority label")
        balance = ", ".join(f"{label}={count}" for label, count in self.class_balance.items())
        lines.append(f"  classes: {balance} (largest/smallest = {self.imbalance_ratio:.2f})")
        if self.augmentation is not None:
            lines.append(self.augmentation.render())
        return "\n".join(lines)


class QualityPipeline:
    """Cleans a ``text``/``label`` frame and reports every row it drops and why."""

    def __init__(
        self,
        max_text_chars: int,
        allowed_labels: Iterable[str] | None = None,
        min_labels: int = 2,
    ) -> None:
        self.max_text_chars = max_text_chars
        self.allowed_labels = set(allowed_labels) if allowed_labels is not None else None
        self.min_labels = min_labels

    def run(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, QualityReport]:
        """Return the cleaned frame (extra columns kept, order preserved) and its report."""
        dropped: dict[str, DropReason] = {}
        rows_in = len(frame)
        data = frame.copy()
        data["text"] = data["text"].astype(str).map(normalize_text)
        data["label"] = data["label"].astype(str).map(normalize_text)

        data = self._drop(data, data["text"] == "", "empty_text", dropped)
        data = self._drop(data, data["label"] == "", "empty_label", dropped)
        data = self._drop(data, data["text"].str.len() > self.max_text_chars, "too_long", dropped)
        if self.allowed_labels is not None:
            data = self._drop(data, ~data["label"].isin(self.allowed_labels), "unknown_label", dropped)

        data = self._drop(data, data.duplicated(["text", "label"]), "exact_duplicate", dropped)
        data["_key"] = data["text"].map(dedupe_key)
        data, conflicts = self._resolve_conflicts(data, dropped)
        data = self._drop(data, data.duplicated(["_key", "label"]), "normalized_duplicate", dropped)
        data = data.drop(columns="_key").reset_index(drop=True)

        if data.empty:
            raise DatasetError(f"no rows left after cleaning {rows_in} rows; see the drop reasons: {_summary(dropped)}")
        balance = data["label"].value_counts()
        if len(balance) < self.min_labels:
            raise DatasetError(
                f"need at least {self.min_labels} distinct labels after cleaning, found {sorted(balance.index)}"
            )
        report = QualityReport(
            rows_in=rows_in,
            rows_out=len(data),
            dropped=dropped,
            conflicts_resolved=conflicts,
            class_balance={str(k): int(v) for k, v in balance.sort_index().items()},
            imbalance_ratio=round(float(balance.max() / balance.min()), 4),
        )
        return data, report

    @staticmethod
    def _drop(data: pd.DataFrame, mask: pd.Series, reason: str, dropped: dict[str, DropReason]) -> pd.DataFrame:
        count = int(mask.sum())
        if count:
            entry = dropped.setdefault(reason, DropReason())
            entry.count += count
            room = EXAMPLES_PER_REASON - len(entry.examples)
            entry.examples.extend(data.loc[mask, "text"].head(max(room, 0)).astype(str).tolist())
        return data.loc[~mask]

    def _resolve_conflicts(
        self, data: pd.DataFrame, dropped: dict[str, DropReason]
    ) -> tuple[pd.DataFrame, int]:
        """Same text, different labels: keep the majority label, drop the texts whose vote is tied."""
        labels_per_key = data.groupby("_key")["label"].nunique()
        conflicted = labels_per_key[labels_per_key > 1].index
        if conflicted.empty:
            return data, 0
        votes = data[data["_key"].isin(conflicted)].groupby(["_key", "label"]).size().rename("votes").reset_index()
        top = votes.groupby("_key")["votes"].transform("max")
        winners = votes[votes["votes"] == top]
        tied_keys = set(winners["_key"][winners["_key"].duplicated(keep=False)])
        clear = winners[~winners["_key"].isin(tied_keys)]
        majority: dict[str, str] = dict(zip(clear["_key"], clear["label"], strict=True))
        data = self._drop(data, data["_key"].isin(tied_keys), "conflict_tied", dropped)
        in_conflict = data["_key"].isin(majority.keys())
        minority = in_conflict & (data["label"] != data["_key"].map(majority))
        data = self._drop(data, minority, "conflict_minority", dropped)
        return data, len(majority)


def _summary(dropped: dict[str, DropReason]) -> str:
    return ", ".join(f"{reason}={drop.count}" for reason, drop in dropped.items()) or "none"
