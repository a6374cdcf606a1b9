"""One retrain run: lock, assemble data, fine-tune the candidate challengers, gate the best against the champion,
promote or not."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

import pandas as pd
from sqlmodel import col, select

from flywheel.database import Database
from flywheel.events import utcnow
from flywheel.label_set import LabelSet
from flywheel.labels import LabelLedger
from flywheel.models.retrain import RetrainRun, RetrainRunPublic, RunStatus, RunTrigger
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.candidates import GRID, Scored, candidates, combine, score_version, train_candidate
from retrain.dataset import RetrainData, assemble, judged, retained_rows, with_held_out
from retrain.evaluation import bootstrap_macro_f1
from retrain.gate import GateLimits, decide, keeps_holdout, refit_refused, replaces, summary
from retrain.lease import RetrainLock
from retrain.promotion import Promoter, RunNotFoundError, starting_point
from retrain.shadow_phase import ShadowPhase

logger = logging.getLogger(__name__)

FINAL = (RunStatus.PROMOTED, RunStatus.REJECTED, RunStatus.SKIPPED, RunStatus.FAILED)


class RetrainRunner:
    """Executes retrain runs and keeps their history in the ``retrain_run`` table."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        registry: ModelRegistry,
        *,
        stop: threading.Event | None = None,
        progress: bool = True,
    ) -> None:
        self.settings = settings
        self.database = database
        self.labels = LabelLedger(database)
        self.registry = registry
        self.stop = stop or threading.Event()
        self.progress = progress
        self.lock = RetrainLock(database, settings.retrain_lease_seconds)
        self.promoter = Promoter(database, registry, self.lock)
        self.shadow_phase = ShadowPhase(settings, database, registry, self.lock)

    # History

    def request(self, trigger: RunTrigger, reason: str | None = None) -> RetrainRunPublic:
        """Queue a run for the worker; an already queued run is returned instead of a second one."""
        with self.database.session() as session:
            queued = session.exec(select(RetrainRun).where(col(RetrainRun.status) == RunStatus.QUEUED)).first()
            if queued is None:
                queued = RetrainRun(trigger=trigger, reason=reason)
                session.add(queued)
                session.flush()
            return RetrainRunPublic.model_validate(queued, from_attributes=True)

    def runs(self, limit: int = 50) -> list[RetrainRunPublic]:
        """Most recent runs first."""
        with self.database.read_session() as session:
            rows = session.exec(select(RetrainRun).order_by(col(RetrainRun.created_at).desc()).limit(limit))
            return [RetrainRunPublic.model_validate(row, from_attributes=True) for row in rows]

    def get(self, run_id: str) -> RetrainRunPublic:
        """One run by id."""
        with self.database.read_session() as session:
            row = session.get(RetrainRun, run_id)
            if row is None:
                raise RunNotFoundError(f"no retrain run {run_id!r}; `flywheel runs` lists them")
            return RetrainRunPublic.model_validate(row, from_attributes=True)

    def queued(self) -> RetrainRunPublic | None:
        """The oldest queued run, if any."""
        with self.database.read_session() as session:
            query = select(RetrainRun).where(col(RetrainRun.status) == RunStatus.QUEUED)
            row = session.exec(query.order_by(col(RetrainRun.created_at))).first()
            return RetrainRunPublic.model_validate(row, from_attributes=True) if row else None

    def new_labels(self) -> int:
        """Accepted, unused feedback newer than both the champion and the last finished run, anonymous labels only
        once vetted: what the worker compares with ``retrain_min_new_labels``."""
        champion = self.registry.champion()
        since = self.registry.get(champion).card.created_at if champion else None
        with self.database.read_session() as session:
            last = session.exec(
                select(RetrainRun.started_at)
                .where(col(RetrainRun.status).in_(FINAL), col(RetrainRun.started_at).is_not(None))
                .order_by(col(RetrainRun.started_at).desc())
            ).first()
            if last is not None and (since is None or last > since):
                since = last
        return self.labels.count_new(since)

    # Execution

    def run(self, trigger: RunTrigger, run_id: str | None = None) -> RetrainRunPublic | None:
        """Run now if no other worker is retraining; None when the lock is held elsewhere (queued runs stay queued)."""
        if not self.lock.acquire():
            logger.info("another worker holds the retrain lock; not starting a %s run", trigger)
            return None
        with self.lock.heartbeat():
            self.recover()
            run = self._start(trigger, run_id)
            started = time.monotonic()
            try:
                self._execute(run.run_id)
            except BaseException as exc:
                reason = "stopped before it finished" if isinstance(exc, KeyboardInterrupt | SystemExit) else str(exc)
                logger.exception("retrain run %s failed", run.run_id)
                self._finish(run.run_id, RunStatus.FAILED, f"failed: {reason}"[:1000], started)
                if not isinstance(exc, Exception):
                    raise
        return self.get(run.run_id)

    def recover(self) -> int:
        """Close runs left active by a worker that died, keeping labels and the champion pointer consistent (see
        ``retrain.promotion``); call only while holding the lock."""
        return self.promoter.recover()

    def _start(self, trigger: RunTrigger, run_id: str | None) -> RetrainRunPublic:
        now = utcnow()
        with self.database.session() as session:
            row = session.get(RetrainRun, run_id) if run_id else None
            if row is None or row.status != RunStatus.QUEUED:
                row = RetrainRun(trigger=trigger)
                session.add(row)
            row.status, row.started_at, row.heartbeat_at, row.worker = RunStatus.RUNNING, now, now, self.lock.holder
            session.flush()
            return RetrainRunPublic.model_validate(row, from_attributes=True)

    def _update(self, run_id: str, **values: Any) -> None:
        with self.database.session() as session:
            row = session.get(RetrainRun, run_id)
            if row is None:
                raise RunNotFoundError(f"retrain run {run_id} disappeared")
            for key, value in values.items():
                setattr(row, key, value)
            row.heartbeat_at = utcnow()

    def _finish(self, run_id: str, status: RunStatus, reason: str, started: float) -> None:
        self._update(
            run_id,
            status=status,
            reason=reason,
            finished_at=utcnow(),
            duration_seconds=round(time.monotonic() - started, 2),
        )
        logger.info("retrain run %s: %s — %s", run_id, status, reason)

    def _execute(self, run_id: str) -> None:
        started = time.monotonic()
        start = starting_point(self.registry)
        champion = start.baseline
        s = self.settings
        pseudo = (
            self.labels.confident_predictions(utcnow() - timedelta(hours=s.retrain_self_training_hours),
                                              s.retrain_self_training_min_confidence)
            if s.retrain_self_training
            else []
        )
        rows, added = self.labels.training_rows(), LabelSet(self.database).added_names()
        # Each fold holds out its share of the trusted labels; together they judge every one (cross-fitting).
        folds = [assemble(champion, rows, s, s.seed, added_labels=added, pseudo_labels=pseudo, fold=fold)
                 for fold in range(s.retrain_folds)]
        data = judged(folds)
        self._update(
            run_id,
            champion_version=champion.version,
            original_rows=data.original_rows,
            feedback_rows=data.feedback_rows,
            feedback_train_rows=len(data.feedback_train_ids),
            feedback_eval_rows=len(data.feedback_eval),
        )
        skip = self._skip_reason(data)
        if skip is not None:
            self._finish(run_id, RunStatus.SKIPPED, skip + self._cap_note(data), started)
            return

        limits = GateLimits(
            min_gain=self.settings.retrain_min_gain,
            max_holdout_drop=self.settings.retrain_max_holdout_drop,
            max_class_drop=self.settings.retrain_max_class_drop,
            holdout_confidence=self.settings.retrain_holdout_confidence,
            seed=self.settings.seed,
        )
        retained, truth = retained_rows(self.settings, data), data.feedback_eval["label"].tolist()
        champion_scored = combine("champion", [score_version(champion, fold, retained) for fold in folds], truth)
        self._update(run_id, champion_metrics=champion_scored.metrics)
        tried, records = self._train_candidates(
            run_id, champion, folds, retained, truth, champion_scored=champion_scored, limits=limits, started=started
        )
        allowed = [scored for scored in tried if scored.refused is None]
        if not allowed:
            reasons = "; ".join(f"{scored.name}: {scored.refused}" for scored in tried)
            self._finish(run_id, RunStatus.REJECTED, f"no candidate kept the golden holdout — {reasons}"[:1000]
                         + self._cap_note(data), started)
            return
        best = self._choose(allowed, data, limits, records)
        self._update(run_id, candidates=records)
        interval = self._gain(best, champion_scored, data)
        decision = decide(champion_scored.scores, best.scores, limits, interval)
        evidence = {
            "feedback_eval_rows": len(data.feedback_eval),
            "folds": len(folds),
            "self_training_rows": data.self_training_rows,
            "chosen": best.name,
            "gain": round(best.scores.feedback_macro_f1 - champion_scored.scores.feedback_macro_f1, 6),
            "gain_interval": [round(interval[0], 6), round(interval[1], 6)],
            "confidence": self.settings.retrain_gain_confidence,
        }
        self._update(
            run_id, challenger_version=best.version.version, challenger_metrics=best.metrics, gate_evidence=evidence
        )
        note = f" [candidate {best.name} of {len(tried)}]" + self._cap_note(data) + start.note
        if not decision.promote:
            self._finish(run_id, RunStatus.REJECTED, decision.reason + note, started)
            return
        served, learned = self._refit(run_id, champion, folds[0], retained, best, champion_scored=champion_scored,
                                      limits=limits, records=records, started=started)
        if served is not best:
            note += f"; serving {served.name}: its recipe again with the {len(data.feedback_eval)} held-out labels"
            evidence["served"] = served.name
            self._update(run_id, challenger_version=served.version.version, challenger_metrics=served.metrics,
                         gate_evidence=evidence)
        # A compare-and-swap from the champion the run started from, fenced by the lease; the labels are marked used
        # in the same transaction that records the promotion (``retrain.promotion`` lists the crash windows). With a
        # shadow phase the challenger is deployed as a shadow first, and the worker promotes it later the same way.
        promote = self.shadow_phase.begin if self.settings.retrain_shadow_minutes else self.promoter.promote
        promote(run_id, challenger=served.version.version, expected=start.expected, feedback_ids=learned,
                reason=(decision.reason + note)[:1000], started=started)

    def _gain(self, scored: Scored, baseline: Scored, data: RetrainData) -> tuple[float, float]:
        """Paired-bootstrap interval of ``scored``'s held-out feedback macro-F1 minus ``baseline``'s."""
        return bootstrap_macro_f1(
            data.feedback_eval["label"].tolist(),
            scored.predicted,
            sorted(set(data.feedback_eval["label"])),
            baseline=baseline.predicted,
            confidence=self.settings.retrain_gain_confidence,
            seed=self.settings.seed,
        )

    def _choose(
        self,
        allowed: list[Scored],
        data: RetrainData,
        limits: GateLimits,
        records: list[dict[str, Any]],
    ) -> Scored:
        """The first listed candidate that kept the holdout, unless another is surely better on held-out feedback and
        keeps the retained rows against it (``retrain.gate.replaces``); the best of those on the feedback then."""
        reference, better = allowed[0], []
        for scored in allowed[1:]:
            # The feedback gain is paired on the same rows; the retained rows are judged as a champion's would be.
            why = replaces(reference.scores, scored.scores, limits, self._gain(scored, reference, data))
            note = {"versus": reference.name, "replaces": why is None, "why_not": why}
            next(record for record in records if record.get("name") == scored.name).update(note)
            if why is None:
                better.append(scored)
        logger.info("retrain candidates: reference %s, %d of %d others surely better and as retentive",
                    reference.name, len(better), len(allowed) - 1)
        return max(better, key=lambda scored: scored.scores.feedback_macro_f1) if better else reference

    def _train_candidates(
        self,
        run_id: str,
        champion: ModelVersion,
        folds: list[RetrainData],
        retained: pd.DataFrame,
        truth: list[str],
        *,
        champion_scored: Scored,
        limits: GateLimits,
        started: float,
    ) -> tuple[list[Scored], list[dict[str, Any]]]:
        """Train each candidate of the grid, one model per fold, within the time budget; record every one in the run
        as it finishes. ``truth``: the labels of every fold's held-out rows, in fold order."""
        tried: list[Scored] = []
        records: list[dict[str, Any]] = []
        for candidate in candidates(self.settings):
            # With a refit to come, one model's time stays reserved for it: it is what serves.
            models = len(folds) + (1 if self.settings.retrain_refit else 0)
            skip = self._out_of_time(started, models * _longest_model(records)) if tried else None
            if skip is not None:
                records.append({"name": candidate.name, "skipped": skip})
                continue
            began, parts = time.monotonic(), []
            for fold in folds:
                version = train_candidate(self.settings, self.registry, champion, fold, candidate,
                                          progress=self.progress, stop=self.stop)
                parts.append(score_version(version, fold, retained, name=candidate.name))
            scored = combine(candidate.name, parts, truth)
            # Every model of the recipe must keep the retained rows: the refit that serves is one more draw of it.
            scored.refused = next((why for part in parts
                                   if (why := keeps_holdout(champion_scored.scores, part.scores, limits))), None)
            tried.append(scored)
            records.append(scored.record(candidate, self.settings, time.monotonic() - began))
            self._update(run_id, candidates=list(records))
            logger.info("retrain run %s: candidate %s %s", run_id, candidate.name, summary(
                champion_scored.scores, scored.scores))
        return tried, records

    def _out_of_time(self, started: float, needed: float) -> str | None:
        """Why work that takes ``needed`` seconds may not start within the time budget any more, or None."""
        budget = self.settings.retrain_time_budget_minutes * 60
        elapsed = time.monotonic() - started
        if elapsed + needed <= budget:
            return None
        return f"time budget: {elapsed:.0f} s of {budget:.0f} s used, {needed:.0f} s more needed (the longest so far)"

    def _refit(
        self,
        run_id: str,
        champion: ModelVersion,
        data: RetrainData,
        retained: pd.DataFrame,
        chosen: Scored,
        *,
        champion_scored: Scored,
        limits: GateLimits,
        records: list[dict[str, Any]],
        started: float,
    ) -> tuple[Scored, list[str]]:
        """The model to serve and the labels it learned from: the chosen recipe trained again with the held-out labels
        among its rows (``retrain_refit``; ``data`` is the first fold), or else the chosen candidate's first model.

        The held-out labels judged the recipe; a model that learned from them cannot be measured on them, so it serves
        only when it keeps the retained rows against the champion and against the candidate, within the gate's limits.
        """
        if not self.settings.retrain_refit:
            return chosen, data.feedback_train_ids
        name, skip = f"{chosen.name}+held-out", self._out_of_time(started, _longest_model(records))
        if skip is not None:
            records.append({"name": name, "refit_of": chosen.name, "skipped": skip})
            self._update(run_id, candidates=list(records))
            return chosen, data.feedback_train_ids
        recipe, full, began = GRID[chosen.name], with_held_out(data, self.settings), time.monotonic()
        version = train_candidate(self.settings, self.registry, champion, full, recipe, progress=self.progress,
                                  stop=self.stop)
        refit = score_version(version, data, retained, name=name).trained_on_held_out()
        refit.refused = refit_refused(champion_scored.scores, chosen.scores, refit.scores, limits)
        records.append({**refit.record(recipe, self.settings, time.monotonic() - began), "refit_of": chosen.name})
        self._update(run_id, candidates=list(records))
        logger.info("retrain run %s: %s %s%s", run_id, name, summary(champion_scored.scores, refit.scores),
                    f"; refused {refit.refused}" if refit.refused else "")
        return (chosen, data.feedback_train_ids) if refit.refused else (refit, full.feedback_train_ids)

    def _skip_reason(self, data: RetrainData) -> str | None:
        """Why the gate could not judge a challenger on ``data``, or None when it can."""
        need = self.settings.retrain_min_eval_rows
        if len(data.feedback_eval) < need:
            return (
                f"too few trusted labels to judge a challenger: {len(data.feedback_eval)} held out, need {need}; "
                "trust an annotator (`flywheel sources trust NAME`) or confirm labels"
            )
        if not data.feedback_train_ids:
            return f"not enough fresh feedback: no rows to train on, {len(data.feedback_eval)} held out"
        return None

    def _cap_note(self, data: RetrainData) -> str:
        """The rows the per-principal cap left out, for the run's reason (the run table has no column for them)."""
        if not data.capped:
            return ""
        biggest = sorted(data.capped.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{source} {count}" for source, count in biggest[:3]) + (", ..." if len(biggest) > 3 else "")
        share = self.settings.retrain_max_principal_share
        return f"; the per-principal cap ({share * 100:g}%) left out {data.capped_rows} feedback rows ({shown})"


def _longest_model(records: list[dict[str, Any]]) -> float:
    """Seconds of the slowest single model trained so far: a candidate's record covers one model per fold."""
    return max((float(record.get("seconds") or 0.0) / len(record.get("folds") or [None]) for record in records),
               default=0.0)
