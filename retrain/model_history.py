"""What the model page shows: every registered version with its golden-holdout scores, the retrain run that produced
it, the champion pointer's history, and macro-F1 over versions as a chart.

It is read from the places that own it, and changes nothing: the registry (cards, the pointer), the ``retrain_run``
table (each run with the candidate records ``retrain.runner`` writes), and, through ``LiveResults``, what a version's
shadow and canary phases measured on live traffic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlmodel import col, or_, select

from flywheel.charts import LEFT, PLOT_W, AxisLabel, Frame, ticks, y_of
from flywheel.database import Database
from flywheel.models.retrain import RetrainRun, RetrainRunPublic
from flywheel.registry import ChampionPointer, ModelRegistry, ModelVersion, PointerChange
from retrain.evaluation import Metrics

logger = logging.getLogger(__name__)

#: Newest runs read to find the run of each version: every version of the last thousand runs has its run.
MAX_RUNS = 1000
#: Colours of the chart's points: the champion, earlier champions, versions that never served.
POINT_COLOURS = {"champion": "#1e7b34", "promoted": "#4e79a7", "candidate": "#8a8a8a"}


class CandidateRecord(BaseModel):
    """One challenger as its run recorded it; what a run of an older Flywheel did not record stays None."""

    name: str
    version: str | None = None
    start: str | None = None
    learning_rate: float | None = None
    feedback_weight_scale: float | None = None
    seconds: float | None = None
    steps: int | None = None
    #: Macro-F1 on the retained rows (the golden holdout and the champion's validation rows) and their count.
    holdout_macro_f1: float | None = None
    holdout_rows: int | None = None
    #: Macro-F1 on the run's held-out slice of fresh trusted feedback.
    feedback_macro_f1: float | None = None
    #: Why the gate could not take it (it gave up too much of the holdout).
    refused: str | None = None
    #: Why it was not trained (the run's time budget).
    skipped: str | None = None
    #: The reference candidate it was compared with, and why it did not replace it.
    versus: str | None = None
    why_not: str | None = None
    #: The candidate whose recipe it trained again with the held-out slice among its rows, once the gate chose it.
    refit_of: str | None = None
    #: Its models, one per fold of the judged feedback, when the gate cross-fitted (``version`` is the first).
    folds: list[str] | None = None


class GateEvidence(BaseModel):
    """What the gate decided on: the held-out slice, the chosen candidate, its gain and the gain's interval."""

    feedback_eval_rows: int | None = None
    self_training_rows: int | None = None
    chosen: str | None = None
    #: Folds of the trusted feedback the recipes were judged on out of fold (1: a single held-out slice).
    folds: int | None = None
    #: The model served in the chosen candidate's place: its recipe trained again with the held-out slice.
    served: str | None = None
    gain: float | None = None
    gain_interval: list[float] | None = None
    confidence: float | None = None


@dataclass(frozen=True)
class RunView:
    """A retrain run with its records parsed, and the champion's scores it measured the candidates against."""

    run: RetrainRunPublic
    candidates: list[CandidateRecord]
    evidence: GateEvidence | None
    champion_holdout_f1: float | None
    champion_feedback_f1: float | None


@dataclass(frozen=True)
class LiveResult:
    """Figures measured of one version on live traffic (a shadow or canary phase), as the page prints them."""

    title: str
    #: (what, value) pairs, both plain text: the page escapes them.
    figures: Sequence[tuple[str, str]]


#: Where shadow and canary results come from: given the database and the versions a page shows, the results of each
#: (absent: none); ``retrain.live_results.deployment_results`` reads them from the deployment table.
LiveResults = Callable[[Database, Sequence[str]], Mapping[str, Sequence[LiveResult]]]


@dataclass(frozen=True)
class VersionView:
    """One registered version as the page shows it."""

    entry: ModelVersion
    #: Its golden-holdout scores; None when its card's metrics cannot be read.
    holdout: Metrics | None
    champion: bool
    #: Made champion at some time, now or before.
    promoted: bool
    run: RunView | None = None
    #: Its record among the run's candidates.
    candidate: CandidateRecord | None = None
    #: The candidate the run's gate judged against the champion.
    chosen: bool = False
    live: Sequence[LiveResult] = ()

    @property
    def version(self) -> str:
        return self.entry.version

    @property
    def kind(self) -> str:
        """champion, promoted (an earlier champion) or candidate (never served)."""
        return "champion" if self.champion else "promoted" if self.promoted else "candidate"


@dataclass(frozen=True)
class ChartPoint:
    """One version on the macro-F1 chart, linking to its detail."""

    version: str
    kind: str
    cx: float
    cy: float
    colour: str
    tip: str


@dataclass(frozen=True, kw_only=True)
class F1Chart(Frame):
    """Everything ``models_chart.html`` draws: golden-holdout macro-F1 per version, in registration order."""

    line: str = ""
    points: list[ChartPoint] = field(default_factory=list)


@dataclass(frozen=True)
class ModelHistory:
    """Every version (oldest first), the pointer, and the chart."""

    versions: list[VersionView]
    pointer: ChampionPointer
    chart: F1Chart

    @property
    def champion(self) -> VersionView | None:
        return next((view for view in self.versions if view.champion), None)

    @property
    def rollback_to(self) -> str | None:
        """The version a rollback would restore, if any."""
        return self.pointer.stack[-2] if len(self.pointer.stack) > 1 else None

    @property
    def changes(self) -> list[PointerChange]:
        """Promotions and rollbacks, newest first."""
        return list(reversed(self.pointer.history))

    def newest(self, limit: int) -> list[VersionView]:
        """The ``limit`` newest versions, newest first."""
        return list(reversed(self.versions))[:limit]

    def get(self, version: str) -> VersionView | None:
        return next((view for view in self.versions if view.version == version), None)


def load_history(registry: ModelRegistry, database: Database, live_results: LiveResults | None = None) -> ModelHistory:
    """The model page's whole content, read now."""
    entries = registry.list()
    pointer = registry.pointer()
    produced = _runs_by_version(database)
    live = live_results(database, [entry.version for entry in entries]) if live_results is not None and entries else {}
    promoted = pointer.promoted | set(pointer.stack)
    versions = []
    for entry in entries:
        run, record = produced.get(entry.version, (None, None))
        versions.append(
            VersionView(
                entry=entry,
                holdout=_holdout(entry),
                champion=entry.version == pointer.champion,
                promoted=entry.version in promoted,
                run=run,
                candidate=record,
                chosen=run is not None and run.run.challenger_version == entry.version,
                live=live.get(entry.version, ()),
            )
        )
    return ModelHistory(versions=versions, pointer=pointer, chart=f1_chart(versions))


def f1_chart(versions: list[VersionView]) -> F1Chart:
    """Golden-holdout macro-F1 of each version, oldest left, evenly spaced; the y axis starts a little below the
    lowest score, so the few points that separate versions stay visible."""
    scored = [(view, view.holdout.macro_f1) for view in versions if view.holdout is not None]
    if not scored:
        return F1Chart()
    low = max(0.0, round(math.floor(min(f1 for _, f1 in scored) * 10) / 10 - 0.1, 1))

    def x_of(index: int) -> float:
        return LEFT + PLOT_W / 2 if len(scored) == 1 else LEFT + PLOT_W * index / (len(scored) - 1)

    points = []
    for index, (view, f1) in enumerate(scored):
        state = {"champion": " (champion)", "promoted": " (champion before)", "candidate": ""}[view.kind]
        tip = f"{view.version}, registered {view.entry.card.created_at:%Y-%m-%d %H:%M} UTC: macro-F1 {f1:.4f}{state}"
        points.append(ChartPoint(view.version, view.kind, x_of(index), y_of(f1, low), POINT_COLOURS[view.kind], tip))
    first, last = scored[0][0], scored[-1][0]
    ends = [(0, first, "start"), (len(scored) - 1, last, "end")] if len(scored) > 1 else [(0, first, "middle")]
    labels = [
        AxisLabel(x_of(index), anchor, f"{view.version} ({view.entry.card.created_at:%Y-%m-%d})")
        for index, view, anchor in ends
    ]
    line = " ".join(f"{point.cx:.1f},{point.cy:.1f}" for point in points) if len(points) > 1 else ""
    return F1Chart(ticks=ticks(low, 1.0), labels=labels, line=line, points=points)


def _holdout(entry: ModelVersion) -> Metrics | None:
    try:
        return Metrics.model_validate(entry.card.holdout_metrics)
    except ValidationError as exc:
        logger.warning("the holdout metrics of model %s cannot be read: %s", entry.version, exc)
        return None


def _runs_by_version(database: Database) -> dict[str, tuple[RunView, CandidateRecord | None]]:
    """Each version a run trained, with that run and the version's candidate record."""
    query = (
        select(RetrainRun)
        .where(or_(col(RetrainRun.candidates).is_not(None), col(RetrainRun.challenger_version).is_not(None)))
        .order_by(col(RetrainRun.created_at).desc())
        .limit(MAX_RUNS)
    )
    with database.read_session() as session:
        runs = [RetrainRunPublic.model_validate(row, from_attributes=True) for row in session.exec(query)]
    produced: dict[str, tuple[RunView, CandidateRecord | None]] = {}
    for run in runs:
        view = _run_view(run)
        for record in view.candidates:
            for version in {*(record.folds or []), *([record.version] if record.version else [])}:
                produced[version] = (view, record)
        # Runs recorded before candidates were kept name only the challenger they judged.
        if run.challenger_version and run.challenger_version not in produced:
            produced[run.challenger_version] = (view, None)
    return produced


def _run_view(run: RetrainRunPublic) -> RunView:
    candidates = []
    for record in run.candidates or []:
        try:
            candidates.append(CandidateRecord.model_validate(record))
        except ValidationError as exc:
            logger.warning("retrain run %s has a candidate record the page cannot read: %s", run.run_id, exc)
    evidence = GateEvidence.model_validate(run.gate_evidence) if run.gate_evidence else None
    return RunView(
        run=run,
        candidates=candidates,
        evidence=evidence,
        champion_holdout_f1=_macro_f1(run.champion_metrics, "retained"),
        champion_feedback_f1=_macro_f1(run.champion_metrics, "feedback"),
    )


def _macro_f1(metrics: dict[str, Any] | None, part: str) -> float | None:
    value = (metrics or {}).get(part, {}).get("macro_f1")
    return float(value) if isinstance(value, int | float) else None
