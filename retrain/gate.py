"""The promotion gate: a challenger serves only when it is better on trusted fresh feedback, no worse on the holdout."""

from __future__ import annotations

from pydantic import BaseModel


class GateScores(BaseModel):
    """One model's macro-F1 on the golden holdout and on the held-out slice of trusted feedback."""

    holdout_macro_f1: float
    feedback_macro_f1: float


class GateDecision(BaseModel):
    """Promote or not, and why, in words an operator can read."""

    promote: bool
    reason: str


def decide(champion: GateScores, challenger: GateScores, min_gain: float, max_holdout_drop: float) -> GateDecision:
    """Promote when feedback macro-F1 gains more than ``min_gain`` and holdout macro-F1 drops ≤ ``max_holdout_drop``."""
    gain = challenger.feedback_macro_f1 - champion.feedback_macro_f1
    drop = champion.holdout_macro_f1 - challenger.holdout_macro_f1
    summary = (
        f"feedback macro-F1 {champion.feedback_macro_f1:.4f} -> {challenger.feedback_macro_f1:.4f} ({gain:+.4f}), "
        f"holdout macro-F1 {champion.holdout_macro_f1:.4f} -> {challenger.holdout_macro_f1:.4f} ({-drop:+.4f})"
    )
    if gain <= min_gain:
        return GateDecision(promote=False, reason=f"no gain on fresh feedback: {summary}")
    if drop > max_holdout_drop:
        return GateDecision(
            promote=False, reason=f"golden holdout fell more than {max_holdout_drop:.4f}: {summary}"
        )
    return GateDecision(promote=True, reason=f"better on fresh feedback, holdout kept: {summary}")
