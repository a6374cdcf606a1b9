"""Assembling a retrain set: the champion's training data replayed plus accepted feedback, with a held-out slice.

Two rules keep one principal from steering a retrain: only trusted labels are held out to judge the challenger
(a poisoner must not write the exam its own challenger sits), and no untrusted source supplies more than
``retrain_max_principal_share`` of the feedback the challenger trains on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flywheel.errors import DatasetError
from flywheel.holdout import stratified_split
from flywheel.labels import TrainingLabel
from flywheel.registry import ModelVersion
from flywheel.settings import Settings
from flywheel.text import dedupe_key, normalize_text
from retrain.pipeline import validation_data

logger = logging.getLogger(__name__)

#: Guards the share cap against float error (0.2 * 50 must allow 10 rows, not 9).
_EPSILON = 1e-9


@dataclass
class RetrainData:
    """Rows to train the challenger on, and fresh trusted feedback it must never see, for the gate."""

    train: pd.DataFrame
    feedback_eval: pd.DataFrame
    feedback_train_ids: list[str]
    original_rows: int
    feedback_rows: int
    #: Feedback rows left out by the per-principal cap, by untrusted source; they stay accepted for later runs.
    capped: dict[str, int] = field(default_factory=dict)
    #: Rows to choose the challenger's checkpoint on, by ``group`` ("original": the champion's own validation rows,
    #: "feedback": a share of the training feedback); None when the champion kept no validation rows.
    validation: pd.DataFrame | None = None

    @property
    def capped_rows(self) -> int:
        """Feedback rows the per-principal cap left out, all sources together."""
        return sum(self.capped.values())


def cap_untrusted(rows: pd.DataFrame, share: float) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep at most ``share`` of the kept rows from any one untrusted source; trusted rows are exempt.

    Each untrusted source keeps its newest rows: recent labels describe the traffic the model serves now, and the
    older ones stay accepted for a later retrain. Returns the kept rows, in their order, and drops per source.
    """
    untrusted = rows[~rows["trusted"]]
    sizes = untrusted["source"].value_counts().to_numpy()

    def allowed(cap: int) -> int:
        kept = len(rows) - len(untrusted) + int(np.minimum(sizes, cap).sum())
        return math.floor(share * kept + _EPSILON)

    # The largest cap c with c <= share x (rows kept under c). Rows kept only shrink with c, so stepping down from
    # the uncapped bound settles on it. With no trusted rows, fewer than 1 / share sources keep nothing.
    cap = allowed(len(rows))
    while (lower := allowed(cap)) < cap:
        cap = lower
    newest = untrusted.sort_values(["created_at", "feedback_id"], ascending=False, kind="stable")
    dropped = newest[newest.groupby("source").cumcount() >= cap]
    capped = {str(source): int(count) for source, count in dropped["source"].value_counts().items()}
    return rows.drop(index=dropped.index), capped


def assemble(champion: ModelVersion, labels: Sequence[TrainingLabel], settings: Settings, seed: int) -> RetrainData:
    """Replay the champion's data, add capped feedback (trusted rows weighted higher), hold out trusted texts."""
    known = set(champion.card.labels)
    feedback = pd.DataFrame(
        [
            {
                "feedback_id": row.feedback_id,
                "text": normalize_text(row.text),
                "label": row.label,
                "source": row.source,
                "trusted": row.trusted,
                "created_at": row.created_at,
            }
            for row in labels
            # Accepted means vetted: a possible label error was accepted by a trusted source or a reviewer, and
            # those corrections of confident mistakes teach the most. Unresolved conflicts between sources never train.
            if row.label in known and not row.conflict
        ],
        columns=["feedback_id", "text", "label", "source", "trusted", "created_at"],
    )
    feedback = feedback[feedback["text"] != ""].astype({"trusted": bool})
    feedback["_key"] = feedback["text"].map(dedupe_key)
    # The same labels make the same training set whatever order the store returned them in (labels written in
    # one transaction share a timestamp), so a retrain is repeatable.
    feedback = feedback.sort_values(["_key", "label", "feedback_id"], kind="stable", ignore_index=True)

    # Split by text, not by row: the same text labeled twice must not land on both sides. Held-out texts are drawn
    # from trusted labels only; untrusted labels of a held-out text neither train nor judge.
    keys = np.array(sorted(feedback.loc[feedback["trusted"], "_key"].unique()))
    rng = np.random.default_rng(seed)
    n_eval = round(len(keys) * settings.retrain_eval_fraction) if len(keys) > 1 else 0
    eval_keys = set(rng.choice(keys, size=n_eval, replace=False)) if n_eval else set()
    held_out = feedback["_key"].isin(eval_keys)
    feedback_eval = feedback[held_out & feedback["trusted"]][["text", "label"]].reset_index(drop=True)
    feedback_train, capped = cap_untrusted(feedback[~held_out], settings.retrain_max_principal_share)

    original = pd.read_parquet(champion.training_data_path)
    if len(original) > settings.retrain_replay_rows:
        original = original.sample(n=settings.retrain_replay_rows, random_state=seed)
    # A correction overrides what the original data says about the same text; eval texts stay unseen; a row the cap
    # left out changes nothing.
    original = original[~original["text"].map(dedupe_key).isin(eval_keys | set(feedback_train["_key"]))]
    feedback_rows = feedback_train[["text", "label", "feedback_id"]].assign(
        weight=np.where(feedback_train["trusted"], settings.retrain_feedback_weight, settings.retrain_untrusted_weight)
    )
    validation = _validation(champion, feedback_rows, eval_keys, settings, seed)
    if validation is not None:
        feedback_rows = feedback_rows[~feedback_rows["feedback_id"].isin(validation["feedback_id"])]
    train = pd.concat([original.assign(weight=1.0, feedback_id=None), feedback_rows], ignore_index=True)
    logger.info(
        "retrain data: %d original rows replayed, %d feedback rows to train on (%d left out by the per-principal "
        "cap), %d trusted rows held out",
        len(original),
        len(feedback_train),
        sum(capped.values()),
        len(feedback_eval),
    )
    return RetrainData(
        validation=validation,
        train=train,
        feedback_eval=feedback_eval,
        feedback_train_ids=feedback_train["feedback_id"].tolist(),
        original_rows=len(original),
        feedback_rows=len(feedback),
        capped=capped,
    )


def _validation(
    champion: ModelVersion, feedback: pd.DataFrame, eval_keys: set[str], settings: Settings, seed: int
) -> pd.DataFrame | None:
    """The champion's validation rows plus a stratified share of the training feedback, each as its own group.

    Checkpoints judged on replayed rows would favour the champion, which knows them by heart: the first step always
    looks best and the challenger learns nothing. The champion's validation rows it never trained on, so they show
    what a challenger forgets; the feedback share shows what it learned.
    """
    previous = validation_data(champion)
    if previous is None:
        return None
    taken = eval_keys | set(feedback["text"].map(dedupe_key))
    previous = previous[~previous["text"].map(dedupe_key).isin(taken)].assign(group="original", feedback_id=None)
    held = feedback.iloc[:0]
    if not feedback.empty:
        try:
            _, held = stratified_split(feedback, settings.validation_fraction, seed, "validation")
        except DatasetError:
            # Too few feedback rows to spare any: all of them train, and checkpoints are judged on the original rows.
            held = feedback.iloc[:0]
    return pd.concat([previous, held.assign(group="feedback")], ignore_index=True)[
        ["text", "label", "group", "feedback_id"]
    ]
