"""The promotion gate: a challenger serves only when it is surely better on trusted fresh feedback and neither the
retained rows' macro-F1 nor any class's F1 there got measurably worse by more than allowed."""

from __future__ import annotations

import functools
import math

from pydantic import BaseModel

from retrain.evaluation import bootstrap_change_highs


class GateScores(BaseModel):
    """One model's macro-F1 (and per-class F1) on the retained rows, and macro-F1 on the held-out feedback slice.

    The retained rows are the golden holdout plus the champion's validation rows: both old data no version trained
    on. Two hundred holdout rows cannot see a loss of one point (a lucky holdout made every challenger look worse,
    an unlucky one hid a real loss); twice the rows halve the variance of what the gate reads.
    """

    holdout_macro_f1: float
    feedback_macro_f1: float
    holdout_class_f1: dict[str, float] = {}
    #: Rows of each class among the retained rows: the per-class check cannot resolve less than one row's change.
    holdout_class_rows: dict[str, int] = {}
    #: Rows the holdout figures were measured on.
    holdout_rows: int = 0
    #: Labels the models may output that the retained rows have no row of: no per-class check can judge them.
    unchecked_classes: list[str] = []
    #: The label of each retained row and this model's prediction for it, in the same order for every model of a
    #: run: what the paired interval of a drop resamples. Empty when only the figures are known.
    retained_truth: list[str] = []
    retained_predicted: list[str] = []


class GateLimits(BaseModel):
    """How much better a challenger must be, and how much of the golden holdout it may give up."""

    min_gain: float
    max_holdout_drop: float
    max_class_drop: float
    #: Confidence of the paired-bootstrap interval of a drop on the retained rows. A drop beyond its limit refuses
    #: only when the whole interval lies below zero, i.e. the rows can tell it from noise. None: the figure alone.
    holdout_confidence: float | None = None
    #: Seed of that bootstrap, so one run's decisions repeat.
    seed: int = 0


class GateDecision(BaseModel):
    """Promote or not, and why, in words an operator can read."""

    promote: bool
    reason: str


def summary(champion: GateScores, challenger: GateScores) -> str:
    """Both models' scores side by side (the holdout alone for a challenger that learned from the held-out feedback,
    whose feedback score is NaN)."""
    change = challenger.holdout_macro_f1 - champion.holdout_macro_f1
    holdout = f"holdout macro-F1 {champion.holdout_macro_f1:.4f} -> {challenger.holdout_macro_f1:.4f} ({change:+.4f})"
    if math.isnan(challenger.feedback_macro_f1):
        return holdout
    gain = challenger.feedback_macro_f1 - champion.feedback_macro_f1
    feedback = f"feedback macro-F1 {champion.feedback_macro_f1:.4f} -> {challenger.feedback_macro_f1:.4f} ({gain:+.4f})"
    return f"{feedback}, {holdout}"


def allowed_drop(limit: float, rows: int) -> float:
    """How far an F1 measured on ``rows`` retained rows (one class's, or macro-F1 over all of them) may fall."""
    # One more error among n rows moves their F1 by about 1/n: on a class of 11 rows that is 9 points, and
    # a fixed 3-point limit would refuse every challenger for a single row.
    return max(limit, 1 / rows) if rows else limit


def keeps_holdout(champion: GateScores, challenger: GateScores, limits: GateLimits) -> str | None:
    """Why the challenger gave up too much of the retained rows, or None when it kept them.

    A drop refuses when it exceeds its limit and, where both models' predictions are known and ``limits`` sets a
    confidence, the paired interval of the change lies below zero. On 380 retained rows one standard error of a
    macro-F1 difference is about 1.5 points: refusing on the figure alone refused a model no worse than the champion
    in about one run of four (its figure on 2,000 unseen reviews was +0.4 where the retained rows read -3.3).
    """
    # Resampled only once a drop is over its limit: most checks never need it.
    interval = functools.cache(lambda: _change_highs(champion, challenger, limits))
    drop = champion.holdout_macro_f1 - challenger.holdout_macro_f1
    # The same resolution limit as a class's: on 22 retained rows (a small N-label set whose new label has no holdout
    # row) one row moves macro-F1 by about 4.5 points, and a 1-point limit refuses every candidate for it.
    allowed = allowed_drop(limits.max_holdout_drop, challenger.holdout_rows)
    if drop > allowed and ((highs := interval()) is None or highs[0] < 0):
        return (
            f"golden holdout fell more than {allowed:.4f} (on {challenger.holdout_rows} rows: the "
            f"holdout and the champion's validation rows{_sure(None if highs is None else highs[0], limits)}): "
            f"{summary(champion, challenger)}"
        )
    for label, before in sorted(champion.holdout_class_f1.items()):
        after = challenger.holdout_class_f1.get(label, 0.0)
        rows = champion.holdout_class_rows.get(label, 0)
        allowed = allowed_drop(limits.max_class_drop, rows)
        if before - after > allowed and ((high := _class_high(interval(), label)) is None or high < 0):
            return (
                f"holdout F1 of class {label!r} fell {before:.4f} -> {after:.4f}, more than {allowed:.4f} (on "
                f"{rows} rows of it{_sure(high, limits)}): {summary(champion, challenger)}"
            )
    return None


def _change_highs(
    champion: GateScores, challenger: GateScores, limits: GateLimits
) -> tuple[float, dict[str, float]] | None:
    """Upper ends of the paired intervals of the challenger's change in macro-F1 and per class on the retained rows,
    or None when the gate judges by the figures alone (no confidence set, or a model's predictions unknown)."""
    truth = champion.retained_truth
    if limits.holdout_confidence is None or not truth or truth != challenger.retained_truth:
        return None
    return bootstrap_change_highs(truth, challenger.retained_predicted, champion.retained_predicted,
                                  sorted(set(truth)), confidence=limits.holdout_confidence, seed=limits.seed)


def _class_high(highs: tuple[float, dict[str, float]] | None, label: str) -> float | None:
    """One class's upper end from ``_change_highs``, or None when the gate judges by the figures alone."""
    return None if highs is None else highs[1].get(label, -1.0)


def _sure(high: float | None, limits: GateLimits) -> str:
    """The interval's upper end behind a refusal, for its reason."""
    if high is None or limits.holdout_confidence is None:
        return ""
    return f"; surely worse: the {limits.holdout_confidence:.0%} interval of the change ends at {high:+.4f}"


def decide(
    champion: GateScores, challenger: GateScores, limits: GateLimits, gain_interval: tuple[float, float]
) -> GateDecision:
    """Promote when the held-out feedback gain's lower bound exceeds ``min_gain`` and the holdout was kept.

    ``gain_interval`` is the paired-bootstrap interval of the challenger's feedback macro-F1 minus the champion's on
    the same held-out rows: a gain the slice cannot tell from noise does not promote.
    """
    text = summary(champion, challenger)
    low, high = gain_interval
    if low <= limits.min_gain:
        return GateDecision(
            promote=False,
            reason=f"no sure gain on fresh feedback (interval of the gain [{low:+.4f}, {high:+.4f}]): {text}",
        )
    refused = keeps_holdout(champion, challenger, limits)
    if refused is not None:
        return GateDecision(promote=False, reason=refused)
    return GateDecision(
        promote=True,
        reason=f"better on fresh feedback (interval of the gain [{low:+.4f}, {high:+.4f}]), holdout kept: {text}"
        + unchecked(champion),
    )


def unchecked(champion: GateScores) -> str:
    """The classes the per-class check skipped, and why, for the decision's reason."""
    if not champion.unchecked_classes:
        return ""
    names = ", ".join(repr(label) for label in champion.unchecked_classes)
    return f"; per-class check skipped for {names}: the golden holdout has no rows of it"


def replaces(
    reference: GateScores, other: GateScores, limits: GateLimits, gain_interval: tuple[float, float]
) -> str | None:
    """Why ``other`` does not replace the run's reference candidate, or None when it does.

    The first listed candidate is the run's reference recipe; another one, which pulls harder toward the new labels
    or starts elsewhere, replaces it only on evidence: surely better on the held-out feedback (the lower end of
    ``gain_interval``, its paired-bootstrap gain over the reference, above ``min_gain``) while keeping the retained
    rows against the reference within the gate's limits. Taking the best slice score alone picks the most
    aggressive recipe whenever the slice cannot tell them apart, and that recipe is the one that forgets.
    """
    low, high = gain_interval
    if low <= limits.min_gain:
        return f"not surely better than the reference on fresh feedback (interval of the gain [{low:+.4f}, " \
            f"{high:+.4f}])"
    forgot = keeps_holdout(reference, other, limits)
    return None if forgot is None else f"against the reference, {forgot}"


def refit_refused(champion: GateScores, chosen: GateScores, refit: GateScores, limits: GateLimits) -> str | None:
    """Why the chosen recipe trained again with the held-out slice among its rows may not serve in the chosen
    candidate's place, or None when it may.

    It learned from the slice, so it has no score there to compare: only forgetting can refuse it, measured on the
    retained rows against the champion (as for any challenger) and against the candidate the gate judged.
    """
    forgot = keeps_holdout(champion, refit, limits)
    if forgot is not None:
        return f"against the champion, {forgot}"
    forgot = keeps_holdout(chosen, refit, limits)
    return None if forgot is None else f"against the judged candidate, {forgot}"
