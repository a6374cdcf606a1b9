"""The retrain gate's shadow phase: a challenger that passed the offline gate is deployed as a shadow first
(``FLYWHEEL_RETRAIN_SHADOW_MINUTES``), and the worker promotes it only once live traffic bears the gate out.

The run waits in status ``shadow`` with its challenger deployed (``flywheel.deployments``); the labels it learned
from stay accepted, listed on the deployment, and are marked used only when it is promoted (by the promotion's own
steps, ``retrain.promotion``). Once its time is up the worker decides: over at least
``FLYWHEEL_RETRAIN_SHADOW_MIN_PREDICTIONS`` shadow predictions, agreement with the served model of at least
``FLYWHEEL_RETRAIN_SHADOW_MIN_AGREEMENT`` and, where trusted feedback arrived for the shadowed requests, accuracy no
more than ``FLYWHEEL_RETRAIN_SHADOW_MAX_ACCURACY_DROP`` below the served model's on the same requests. Otherwise the
shadow ends ``refused`` and the run ``rejected``, each with the reason. A shadow someone stopped or replaced
meanwhile ends its run the same way; one promoted by hand ends it promoted. While a shadow phase is pending the
worker starts no other retrain: it would learn from the same labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from flywheel.comparison import ShadowComparison, shadow_comparison
from flywheel.database import Database
from flywheel.deployments import DeploymentStore
from flywheel.events import utcnow
from flywheel.labels import LabelLedger
from flywheel.models.deployment import (
    Deployment,
    DeploymentCreate,
    DeploymentMode,
    DeploymentOutcome,
    DeploymentPublic,
)
from flywheel.models.retrain import RetrainRun, RetrainRunPublic, RunStatus
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.lease import RetrainLock
from retrain.promotion import ACTIVE, ACTOR, Promoter, RunNotFoundError

logger = logging.getLogger(__name__)

#: Between the shadow phase's state and the gate's reason in a waiting run's reason.
GATE_REASON = "; gate: "


@dataclass(frozen=True)
class ShadowVerdict:
    """Promote or not after the shadow phase, and why."""

    promote: bool
    reason: str


def verdict(figures: ShadowComparison, settings: Settings) -> ShadowVerdict:
    """Whether the shadow's figures meet ``FLYWHEEL_RETRAIN_SHADOW_*``, in words an operator can read."""
    needed = settings.retrain_shadow_min_predictions
    if figures.rows < needed or figures.agreement is None:
        return ShadowVerdict(
            False,
            (
                f"only {figures.rows} shadow predictions, FLYWHEEL_RETRAIN_SHADOW_MIN_PREDICTIONS needs {needed}: "
                "raise FLYWHEEL_RETRAIN_SHADOW_SAMPLE or FLYWHEEL_RETRAIN_SHADOW_MINUTES for quiet traffic"
            ),
        )
    agreement = f"agreement with the served label {figures.agreement:.1%} over {figures.rows} shadow predictions"
    if figures.agreement < settings.retrain_shadow_min_agreement:
        return ShadowVerdict(
            False,
            f"{agreement}, below FLYWHEEL_RETRAIN_SHADOW_MIN_AGREEMENT ({settings.retrain_shadow_min_agreement:.0%})",
        )
    feedback = figures.feedback
    if feedback.challenger_accuracy is None or feedback.served_accuracy is None:
        return ShadowVerdict(True, f"{agreement}; no trusted feedback arrived for the shadowed requests")
    accuracy = (
        f"accuracy on {feedback.labelled} labelled requests {feedback.challenger_accuracy:.1%} vs the served "
        f"model's {feedback.served_accuracy:.1%}"
    )
    if feedback.challenger_accuracy < feedback.served_accuracy - settings.retrain_shadow_max_accuracy_drop:
        return ShadowVerdict(
            False,
            f"{agreement}; {accuracy}, more than FLYWHEEL_RETRAIN_SHADOW_MAX_ACCURACY_DROP "
            f"({settings.retrain_shadow_max_accuracy_drop * 100:.1f} points) below",
        )
    return ShadowVerdict(True, f"{agreement}; {accuracy}")


class ShadowPhase:
    """Deploys a run's challenger as a shadow instead of promoting it, and later decides it."""

    def __init__(
        self, settings: Settings, database: Database, registry: ModelRegistry, lock: RetrainLock | None = None
    ) -> None:
        self.settings = settings
        self.database = database
        self.registry = registry
        #: The runner's lease while a run begins its phase; a lease of its own for the worker's decisions.
        self.lock = lock or RetrainLock(database, settings.retrain_lease_seconds)
        self.promoter = Promoter(database, registry, self.lock)
        self.deployments = DeploymentStore(database, registry)

    def pending(self) -> bool:
        """Whether a run waits in its shadow phase."""
        with self.database.read_session() as session:
            query = select(RetrainRun.run_id).where(col(RetrainRun.status) == RunStatus.SHADOW)
            return session.exec(query).first() is not None

    def begin(
        self,
        run_id: str,
        *,
        challenger: str,
        expected: str,
        feedback_ids: Sequence[str],
        reason: str,
        started: float,
    ) -> RunStatus:
        """Deploy the run's ``challenger`` as a shadow beside ``expected``, the champion the run started from;
        called, as a promotion would be, by the runner holding its lease. The run's final status comes later."""
        current = self.registry.champion()
        if current != expected:
            why = (
                f"the champion changed during the run: it started from {expected}, the pointer now names "
                f"{current or 'no model'}, so its challenger was not deployed; retrain against the current one"
            )
            self._finish(run_id, RunStatus.REJECTED, why, started)
            return RunStatus.REJECTED
        minutes = self.settings.retrain_shadow_minutes
        deployment = self.deployments.start(
            DeploymentCreate(
                version=challenger,
                mode=DeploymentMode.SHADOW,
                share=self.settings.retrain_shadow_sample,
                run_id=run_id,
                feedback_ids=list(feedback_ids),
            ),
            ACTOR,
        )
        due = deployment.started_at + timedelta(minutes=minutes)
        with self.database.session() as session:
            self.lock.confirm(session)
            row = _row(session, run_id)
            row.status, row.heartbeat_at = RunStatus.SHADOW, utcnow()
            row.reason = (
                f"in its shadow phase until {due:%Y-%m-%d %H:%M} UTC on {deployment.share:.0%} of requests"
                f"{GATE_REASON}{reason}"
            )[:1000]
        logger.info("retrain run %s: %s deployed as a shadow for %g minutes", run_id, challenger, minutes)
        return RunStatus.SHADOW

    def settle(self, now: datetime | None = None) -> list[RetrainRunPublic]:
        """Decide every shadow phase that is due, or that ended by hand; the runs it settled."""
        now = now or utcnow()
        with self.database.read_session() as session:
            waiting = list(session.exec(select(RetrainRun).where(col(RetrainRun.status) == RunStatus.SHADOW)))
            orphaned = session.exec(
                select(Deployment).where(col(Deployment.active).is_(True), col(Deployment.run_id).is_not(None))
            ).first()
            owner = session.get(RetrainRun, orphaned.run_id) if orphaned is not None and orphaned.run_id else None
        if orphaned is not None and (owner is None or owner.status not in (*ACTIVE, RunStatus.SHADOW)):
            # Its run ended (its worker died, say) right after deploying it: nothing may promote it now.
            self.deployments.end(
                orphaned.version,
                DeploymentMode.SHADOW,
                DeploymentOutcome.REFUSED,
                actor=ACTOR,
                reason=f"its retrain run {orphaned.run_id} ended without waiting for it",
            )
        if not waiting or not self.lock.acquire():
            return []
        settled = []
        with self.lock.heartbeat():
            for run in waiting:
                if self._settle(run, now):
                    settled.append(self._public(run.run_id))
        return settled

    def _settle(self, run: RetrainRun, now: datetime) -> bool:
        with self.database.read_session() as session:
            found = session.exec(
                select(Deployment).where(col(Deployment.run_id) == run.run_id).order_by(col(Deployment.started_at))
            ).first()
        deployment = DeploymentPublic.model_validate(found, from_attributes=True) if found is not None else None
        #: The labels its challenger learned from, marked used only if it is promoted.
        learned = (found.feedback_ids if found is not None else None) or []
        started = time.monotonic() - (now - (run.started_at or now)).total_seconds()
        if deployment is None or deployment.ended_at is not None:
            self._ended_elsewhere(run, deployment, learned, started)
            return True
        if now < deployment.started_at + timedelta(minutes=self.settings.retrain_shadow_minutes):
            return False
        figures = shadow_comparison(self.database, deployment.version, deployment)
        decision = verdict(figures, self.settings)
        evidence = figures.model_dump(mode="json", exclude={"deployment"})
        if not decision.promote:
            with self.database.session() as session:
                self.deployments.end_in(
                    session,
                    deployment.deployment_id,
                    DeploymentOutcome.REFUSED,
                    actor=ACTOR,
                    reason=decision.reason,
                    evidence=evidence,
                )
            self._finish(
                run.run_id, RunStatus.REJECTED, f"shadow phase: {decision.reason}; gate: {_gate_reason(run)}", started
            )
            return True
        status = self.promoter.promote(
            run.run_id,
            challenger=deployment.version,
            expected=deployment.champion_version or "",
            feedback_ids=learned,
            reason=f"shadow phase: {decision.reason}; gate: {_gate_reason(run)}"[:1000],
            started=started,
        )
        promoted = status in (RunStatus.PROMOTED, RunStatus.PROMOTING)
        outcome = DeploymentOutcome.PROMOTED if promoted else DeploymentOutcome.REFUSED
        with self.database.session() as session:
            why = decision.reason if promoted else (_row(session, run.run_id).reason or str(status))
            self.deployments.end_in(
                session, deployment.deployment_id, outcome, actor=ACTOR, reason=why, evidence=evidence
            )
        return True

    def _ended_elsewhere(
        self, run: RetrainRun, deployment: DeploymentPublic | None, learned: list[str], started: float
    ) -> None:
        """Close a run whose shadow ended before the worker decided: stopped, replaced, or promoted by hand."""
        if deployment is not None and deployment.version in self.registry.pointer().promoted:
            with self.database.session() as session:
                LabelLedger.mark_used_in(session, learned, deployment.version)
            self._finish(
                run.run_id,
                RunStatus.PROMOTED,
                f"promoted by hand during its shadow phase ({deployment.ended_by})",
                started,
            )
            return
        why = (
            f"its shadow ended before the shadow phase decided ({deployment.outcome} by {deployment.ended_by}: "
            f"{deployment.reason})"
            if deployment is not None
            else "its shadow was never deployed"
        )
        self._finish(run.run_id, RunStatus.REJECTED, why, started)

    def _finish(self, run_id: str, status: RunStatus, reason: str, started: float) -> None:
        with self.database.session() as session:
            row = _row(session, run_id)
            row.status, row.reason = status, reason[:1000]
            row.finished_at = row.heartbeat_at = utcnow()
            row.duration_seconds = round(time.monotonic() - started, 2)
        logger.info("retrain run %s: %s — %s", run_id, status, reason)

    def _public(self, run_id: str) -> RetrainRunPublic:
        with self.database.read_session() as session:
            return RetrainRunPublic.model_validate(session.get(RetrainRun, run_id), from_attributes=True)


def _gate_reason(run: RetrainRun) -> str:
    """What the offline gate said, as the run's reason kept it while it waited."""
    return (run.reason or "").partition(GATE_REASON)[2] or run.reason or ""


def _row(session: Session, run_id: str) -> RetrainRun:
    row = session.get(RetrainRun, run_id)
    if row is None:
        raise RunNotFoundError(f"retrain run {run_id} disappeared from the database; `flywheel runs` lists the runs")
    return row
