"""The report of a replay (``flywheel replay``): what a candidate would have answered on logged traffic, as data
(``--json``) and as tables."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, computed_field
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

#: Characters of a text shown in the disagreement table.
_SHOWN_CHARS = 80


class ReplayWindow(BaseModel):
    """The logged traffic replayed."""

    since: datetime
    until: datetime
    #: Only predictions of this version were read (None: every version's).
    served_by_filter: str | None
    #: Predictions logged in the window (with the filter), duplicates of a text included.
    predictions: int
    #: Distinct texts scored: the newest prediction of each.
    texts: int
    limit: int
    #: The limit stopped the read before the window's start: its older predictions were not read.
    limited: bool
    #: Texts scored by the version that served them, most first.
    served_by: dict[str, int]


class Agreement(BaseModel):
    """How often the candidate gives the label that was served, with a 95% Wilson interval."""

    agreed: int
    texts: int
    rate: float
    low: float
    high: float


class LabelShift(BaseModel):
    """One label's share of the window as served and as the candidate labels it."""

    label: str
    logged: int
    candidate: int
    logged_share: float
    candidate_share: float
    #: The serving model(s) had this label (it appears in the logged scores).
    logged_model_has: bool
    #: The candidate's head has an output for it.
    candidate_has: bool

    @computed_field  # type: ignore[prop-decorator]
    @property
    def shift_points(self) -> float:
        """Candidate share minus logged share, in percentage points."""
        return round((self.candidate_share - self.logged_share) * 100, 6)


class ConfusionCell(BaseModel):
    """Texts served as ``logged`` that the candidate labels ``candidate``."""

    logged: str
    candidate: str
    texts: int
    share_of_logged: float


class ConfidenceChange(BaseModel):
    """Mean confidence in the top label, as served and from the candidate."""

    logged: float
    candidate: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def change(self) -> float:
        """Candidate minus logged."""
        return round(self.candidate - self.logged, 6)


class Disagreement(BaseModel):
    """A text the two label differently, with each side's confidence in its own label."""

    prediction_id: str
    #: The text, cut to its first 200 characters.
    text: str
    created_at: datetime
    served_by: str
    logged_label: str
    logged_confidence: float
    candidate_label: str
    candidate_confidence: float
    #: Largest change of any label's probability between the two.
    swing: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def strength(self) -> float:
        """Both sides' confidence multiplied: high when each is sure of a different label (the ranking)."""
        return round(self.logged_confidence * self.candidate_confidence, 6)


class FeedbackCheck(BaseModel):
    """Both sides judged on the replayed texts people labelled (accepted or used feedback)."""

    #: Texts with a label people agree on.
    labelled: int
    #: Texts whose labels disagree as often one way as the other: left out.
    conflicting: int
    #: Of the labelled texts, those whose label the candidate was trained on (its accuracy there flatters it).
    trained_candidate: int
    logged_correct: int
    candidate_correct: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def logged_accuracy(self) -> float:
        """Share of labelled texts the served label got right."""
        return self.logged_correct / self.labelled if self.labelled else 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def candidate_accuracy(self) -> float:
        """Share of labelled texts the candidate gets right."""
        return self.candidate_correct / self.labelled if self.labelled else 0.0


class ReplayResult(BaseModel):
    """Everything a replay found."""

    candidate: str
    candidate_labels: list[str]
    window: ReplayWindow
    agreement: Agreement
    #: Every label either side uses or knows: the candidate's in head order, then the ones only the logs have.
    labels: list[LabelShift]
    #: The most frequent changes of label, most first.
    confusion: list[ConfusionCell]
    confidence: ConfidenceChange
    #: The texts the two disagree on most, the strongest disagreement first.
    disagreements: list[Disagreement]
    #: None when nobody labelled any replayed text.
    feedback: FeedbackCheck | None

    def render(self) -> RenderableType:
        """Tables for the terminal: summary, label shares, changes of label, feedback, disagreements."""
        parts: list[RenderableType] = [self._summary(), self._labels()]
        if self.confusion:
            parts.append(self._confusion())
        if self.feedback is not None:
            parts.append(self._feedback(self.feedback))
        if self.disagreements:
            parts.append(self._disagreements())
        return Group(*parts)

    def _summary(self) -> Text:
        w, a, c = self.window, self.agreement, self.confidence
        served = ", ".join(f"{version} {count}" for version, count in w.served_by.items())
        lines = [
            f"replay of {self.candidate} on {w.texts} distinct texts of {w.predictions} predictions logged "
            f"{w.since:%Y-%m-%d %H:%M} – {w.until:%Y-%m-%d %H:%M} UTC"
            + (f" served by {w.served_by_filter}" if w.served_by_filter else ""),
            f"served by: {served}",
            f"agreement with the served label: {a.rate:.1%} ({a.agreed}/{a.texts}; 95% interval "
            f"{a.low:.1%}–{a.high:.1%})",
            f"mean confidence: served {c.logged:.3f}, candidate {c.candidate:.3f} ({c.change:+.3f})",
        ]
        if w.limited:
            lines.append(
                f"limited to the newest {w.limit} texts: older predictions were not read; raise --limit to replay them"
            )
        return Text("\n".join(lines))

    def _labels(self) -> Table:
        table = Table("label", "served", "candidate", "shift (points)", "note", title="label shares")
        for shift in self.labels:
            note = "" if shift.logged_model_has else "new in the candidate"
            note = note if shift.candidate_has else "the candidate lacks it"
            table.add_row(
                shift.label,
                f"{shift.logged_share:.1%} ({shift.logged})",
                f"{shift.candidate_share:.1%} ({shift.candidate})",
                f"{shift.shift_points:+.1f}",
                note,
            )
        return table

    def _confusion(self) -> Table:
        table = Table("served", "candidate", "texts", "share of served", title="changes of label")
        for cell in self.confusion:
            table.add_row(cell.logged, cell.candidate, str(cell.texts), f"{cell.share_of_logged:.1%}")
        return table

    @staticmethod
    def _feedback(check: FeedbackCheck) -> Table:
        title = f"on {check.labelled} texts people labelled"
        notes = []
        if check.conflicting:
            notes.append(f"{check.conflicting} with conflicting labels left out")
        if check.trained_candidate:
            notes.append(f"the candidate trained on {check.trained_candidate} of them")
        table = Table("model", "correct", "accuracy", title=title + (f" ({'; '.join(notes)})" if notes else ""))
        table.add_row("served", str(check.logged_correct), f"{check.logged_accuracy:.1%}")
        table.add_row("candidate", str(check.candidate_correct), f"{check.candidate_accuracy:.1%}")
        return table

    def _disagreements(self) -> Table:
        table = Table(
            "text", "served", "candidate", "swing", "prediction", title="strongest disagreements", show_lines=False
        )
        for item in self.disagreements:
            text = item.text if len(item.text) <= _SHOWN_CHARS else item.text[: _SHOWN_CHARS - 1] + "…"
            table.add_row(
                text,
                f"{item.logged_label} {item.logged_confidence:.2f} ({item.served_by})",
                f"{item.candidate_label} {item.candidate_confidence:.2f}",
                f"{item.swing:.2f}",
                item.prediction_id,
            )
        return table
