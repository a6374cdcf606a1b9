"""The challengers one retrain run trains: a small fixed grid of ways to learn from new labels.

What decides whether a retrain helps is how hard it pulls toward the new labels against what the champion knew
(learning rate, the weight of feedback rows) and where it starts (the champion as it is, or the champion's encoder
with its head refit as a linear probe on the new data). Each candidate is one such choice; the gate then takes the
best one that keeps the golden holdout.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import pandas as pd

from flywheel.settings import Settings


class Start(StrEnum):
    """Where a candidate's fine-tuning starts."""

    #: The champion, encoder and head.
    WARM = "warm"
    #: The champion's encoder with its head refit by linear probing on the retrain set.
    PROBE = "probe"
    #: The base model with a linear-probe head: a fresh model on replayed and new rows alike.
    BASE = "base"


@dataclass(frozen=True)
class Candidate:
    """One challenger recipe: a start and scales on the settings' learning rate and feedback weight."""

    name: str
    start: Start
    learning_rate_scale: float = 1.0
    feedback_weight_scale: float = 1.0

    def settings(self, settings: Settings) -> Settings:
        """The training settings this candidate runs with."""
        return settings.model_copy(update={"learning_rate": settings.learning_rate * self.learning_rate_scale})

    def weights(self, train: pd.DataFrame) -> pd.Series:
        """Loss weights of the retrain rows: feedback rows (those with a feedback id) scaled by this candidate."""
        is_feedback = train["feedback_id"].notna()
        return train["weight"].where(~is_feedback, train["weight"] * self.feedback_weight_scale).astype(float)

    def describe(self, settings: Settings) -> dict[str, object]:
        """The recipe as recorded in the run: start, learning rate and feedback weight scale."""
        return {
            "start": self.start.value,
            "learning_rate": settings.learning_rate * self.learning_rate_scale,
            "feedback_weight_scale": self.feedback_weight_scale,
        }


#: Every recipe a run may try, by the name ``FLYWHEEL_RETRAIN_CANDIDATES`` lists it under.
GRID: dict[str, Candidate] = {
    candidate.name: candidate
    for candidate in (
        Candidate("warm", Start.WARM),
        Candidate("gentle", Start.WARM, learning_rate_scale=0.5),
        Candidate("bold", Start.WARM, learning_rate_scale=2.0),
        Candidate("eager", Start.WARM, feedback_weight_scale=2.0),
        Candidate("probe", Start.PROBE),
        Candidate("base", Start.BASE),
    )
}


def candidates(settings: Settings) -> list[Candidate]:
    """The recipes this run tries, in the order the settings list them."""
    return [GRID[name] for name in settings.retrain_candidates]
