"""Assembling a retrain set: the champion's training data replayed plus accepted feedback, with a held-out slice."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from flywheel.labels import TrainingLabel
from flywheel.registry import ModelVersion
from flywheel.settings import Settings
from flywheel.text import dedupe_key, normalize_text

logger = logging.getLogger(__name__)


@dataclass
class RetrainData:
    """Rows to train the challenger on, and fresh feedback it must never see, for the gate."""

    train: pd.DataFrame
    feedback_eval: pd.DataFrame
    feedback_train_ids: list[str]
    original_rows: int
    feedback_rows: int


def assemble(champion: ModelVersion, labels: Sequence[TrainingLabel], settings: Settings, seed: int) -> RetrainData:
    """Replay the champion's data, add feedback with a higher weight, hold out a random slice of feedback texts."""
    known = set(champion.card.labels)
    feedback = pd.DataFrame(
        [
            {"feedback_id": row.feedback_id, "text": normalize_text(row.text), "label": row.label}
            for row in labels
            # Accepted means vetted: a possible label error was accepted by a trusted source or a reviewer, and
            # those corrections of confident mistakes teach the most. Unresolved conflicts between sources never train.
            if row.label in known and not row.conflict
        ],
        columns=["feedback_id", "text", "label"],
    )
    feedback = feedback[feedback["text"] != ""]
    feedback["_key"] = feedback["text"].map(dedupe_key)
    # The same labels make the same training set whatever order the store returned them in (labels written in
    # one transaction share a timestamp), so a retrain is repeatable.
    feedback = feedback.sort_values(["_key", "label", "feedback_id"], kind="stable", ignore_index=True)

    # Split by text, not by row: the same text labeled twice must not land on both sides.
    keys = np.array(sorted(feedback["_key"].unique()))
    rng = np.random.default_rng(seed)
    n_eval = round(len(keys) * settings.retrain_eval_fraction) if len(keys) > 1 else 0
    eval_keys = set(rng.choice(keys, size=n_eval, replace=False)) if n_eval else set()
    is_eval = feedback["_key"].isin(eval_keys)
    feedback_eval = feedback[is_eval][["text", "label"]].reset_index(drop=True)
    feedback_train = feedback[~is_eval]

    original = pd.read_parquet(champion.training_data_path)
    if len(original) > settings.retrain_replay_rows:
        original = original.sample(n=settings.retrain_replay_rows, random_state=seed)
    # A correction overrides what the original data says about the same text; eval texts stay unseen.
    original = original[~original["text"].map(dedupe_key).isin(set(feedback["_key"]))]
    train = pd.concat(
        [
            original.assign(weight=1.0, feedback_id=None),
            feedback_train.drop(columns="_key").assign(weight=settings.retrain_feedback_weight),
        ],
        ignore_index=True,
    )
    logger.info(
        "retrain data: %d original rows replayed, %d feedback rows to train on, %d held out",
        len(original),
        len(feedback_train),
        len(feedback_eval),
    )
    return RetrainData(
        train=train,
        feedback_eval=feedback_eval,
        feedback_train_ids=feedback_train["feedback_id"].tolist(),
        original_rows=len(original),
        feedback_rows=len(feedback),
    )
