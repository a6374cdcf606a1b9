"""Assembling a retrain set: the champion's training data replayed plus accepted feedback, with a held-out slice.

Two rules keep one principal from steering a retrain: only trusted labels are held out to judge the challenger
(a poisoner must not write the exam its own challenger sits), and no untrusted source supplies more than
``retrain_max_principal_share`` of the feedback the challenger trains on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from flywheel.errors import DatasetError
from flywheel.holdout import GoldenHoldout, stratified_split
from flywheel.labels import PseudoLabel, TrainingLabel
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
    #: The champion's labels and those of the feedback kept: what a challenger may learn, in the head's order.
    labels: list[str] = field(default_factory=list)
    #: Confident predictions added as low-weight training rows (self-training; 0 when it is off).
    self_training_rows: int = 0

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


def assemble(
    champion: ModelVersion,
    labels: Sequence[TrainingLabel],
    settings: Settings,
    seed: int,
    *,
    added_labels: Collection[str] = (),
    pseudo_labels: Sequence[PseudoLabel] = (),
    fold: int = 0,
) -> RetrainData:
    """Replay the champion's data, add capped feedback (trusted rows weighted higher), hold out trusted texts: fold
    ``fold`` of ``retrain_folds`` (each trusted text is in one fold), or with one fold a ``retrain_eval_fraction``.

    Feedback counts when the champion has its label or an admin added it (``added_labels``): rows of an added label
    make the challenger's head grow by one output. ``pseudo_labels`` (self-training) join the training rows with a
    low weight, capped per class, never on a text that is held out, labeled or validated on.
    """
    known = set(champion.card.labels) | set(added_labels)
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
    eval_keys = _held_out_keys(keys, settings, seed, fold)
    held_out = feedback["_key"].isin(eval_keys)
    feedback_eval = feedback[held_out & feedback["trusted"]][["text", "label", "feedback_id"]].reset_index(drop=True)
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
    taken = eval_keys | set(feedback["_key"]) | set(original["text"].map(dedupe_key))
    if validation is not None:
        taken |= set(validation["text"].map(dedupe_key))
    pseudo = _self_training(pseudo_labels, known, taken, settings)
    train = pd.concat(
        [original.assign(weight=1.0, feedback_id=None), feedback_rows, pseudo], ignore_index=True
    )
    logger.info(
        "retrain data: %d original rows replayed, %d feedback rows to train on (%d left out by the per-principal "
        "cap), %d trusted rows held out, %d self-training rows",
        len(original),
        len(feedback_train),
        sum(capped.values()),
        len(feedback_eval),
        len(pseudo),
    )
    return RetrainData(
        labels=sorted(set(champion.card.labels) | set(feedback_train["label"]) | set(feedback_eval["label"])),
        validation=validation,
        train=train,
        feedback_eval=feedback_eval,
        feedback_train_ids=feedback_train["feedback_id"].tolist(),
        original_rows=len(original),
        feedback_rows=len(feedback),
        capped=capped,
        self_training_rows=len(pseudo),
    )


def _held_out_keys(keys: np.ndarray, settings: Settings, seed: int, fold: int) -> set[str]:
    """The trusted texts (dedupe keys, sorted) ``fold`` holds out: every ``retrain_folds``-th of a seeded order, so the
    folds of one seed partition them; with one fold, a seeded ``retrain_eval_fraction`` of them."""
    rng = np.random.default_rng(seed)
    if len(keys) < 2:
        return set()
    if settings.retrain_folds > 1:
        return set(keys[rng.permutation(len(keys))[fold :: settings.retrain_folds]])
    n_eval = round(len(keys) * settings.retrain_eval_fraction)
    return set(rng.choice(keys, size=n_eval, replace=False)) if n_eval else set()


def _self_training(
    rows: Sequence[PseudoLabel], known: set[str], taken: set[str], settings: Settings
) -> pd.DataFrame:
    """Confident predictions as training rows: known labels, texts not already used, the most confident
    ``retrain_self_training_max_per_class`` per label, weighted ``retrain_self_training_weight``."""
    frame = pd.DataFrame(
        [(normalize_text(row.text), row.label, row.confidence) for row in rows if row.label in known],
        columns=["text", "label", "confidence"],
    )
    frame = frame[frame["text"] != ""]
    keys = frame["text"].map(dedupe_key)
    frame = frame[~keys.isin(taken) & ~keys.duplicated()]
    frame = frame.sort_values("confidence", ascending=False, kind="stable")
    frame = frame.groupby("label", sort=True).head(settings.retrain_self_training_max_per_class)
    return frame[["text", "label"]].assign(weight=settings.retrain_self_training_weight, feedback_id=None)


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


def judged(folds: Sequence[RetrainData]) -> RetrainData:
    """The first fold with every fold's held-out rows as its ``feedback_eval``: the rows a recipe's models are judged
    on together, in fold order."""
    return replace(folds[0], feedback_eval=pd.concat([fold.feedback_eval for fold in folds], ignore_index=True))


def with_held_out(data: RetrainData, settings: Settings) -> RetrainData:
    """``data`` with its held-out slice among the training rows, as trusted feedback: what the chosen recipe trains
    on once the gate has judged it (the slice then has nothing left to judge)."""
    held = data.feedback_eval[["text", "label", "feedback_id"]].assign(weight=settings.retrain_feedback_weight)
    return replace(
        data,
        train=pd.concat([data.train, held], ignore_index=True),
        feedback_train_ids=[*data.feedback_train_ids, *held["feedback_id"]],
    )


def retained_rows(settings: Settings, data: RetrainData) -> pd.DataFrame:
    """Old rows no version trained on, to measure what a challenger forgot: the golden holdout and the champion's
    validation rows (which chose the candidates' checkpoints, so they flatter them slightly)."""
    frames = [GoldenHoldout(settings.home / "holdout").load()[["text", "label"]]]
    if data.validation is not None:
        frames.append(data.validation.loc[data.validation["group"] == "original", ["text", "label"]])
    return pd.concat(frames, ignore_index=True)
