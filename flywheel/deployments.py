"""The challenger deployed beside the champion, kept in the database so every replica agrees: start, end, read;
where a caller's requests go under a canary; and the canary's automatic withdrawal.

At most one challenger is deployed at a time, shadow or canary: deploying another ends the active one as
``replaced`` (a shadow that earned a canary moves on in one command). Every start and end is written with its
audit entry in one transaction, and an ended deployment keeps the figures it ended on (``evidence``), so its record
outlives its shadow rows.

Canary routing hashes the caller's key (its client id when it sent one, else its principal) with the canary's
version: the same caller always lands on the same side while the canary runs, and each new canary draws its own
callers.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from flywheel.access import AuditLog
from flywheel.comparison import CanaryComparison, canary_comparison, compare
from flywheel.database import Database
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.models.deployment import (
    Deployment,
    DeploymentCreate,
    DeploymentMode,
    DeploymentOutcome,
    DeploymentPublic,
    ShadowPrediction,
)
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings

logger = logging.getLogger(__name__)

#: Who the audit log names for automatic canary withdrawals.
CANARY_ACTOR = "canary-watch"
#: Characters of an end's reason kept.
MAX_REASON_CHARS = 2000


class DeploymentError(FlywheelError):
    """A deployment that cannot be started or ended as asked."""


def canary_bucket(key: str, version: str) -> float:
    """Where ``key`` falls in [0, 1) for the canary of ``version``: a hash, the same on every replica and run."""
    digest = hashlib.sha256(f"{version}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def answers_caller(deployment: DeploymentPublic, key: str) -> bool:
    """Whether the canary ``deployment`` answers the caller with routing key ``key``."""
    return deployment.mode == DeploymentMode.CANARY and canary_bucket(key, deployment.version) < deployment.share


def _public(row: Deployment) -> DeploymentPublic:
    return DeploymentPublic.model_validate(row, from_attributes=True)


def _evidence(figures: Any) -> dict[str, Any]:
    """A comparison as the JSON an ended deployment keeps (without the deployment it describes)."""
    return dict(figures.model_dump(mode="json", exclude={"deployment"}))


class DeploymentStore:
    """Starts and ends deployments of challengers; reads the active one and the history."""

    def __init__(self, database: Database, registry: ModelRegistry | None = None) -> None:
        self.database = database
        self.registry = registry

    def active(self) -> DeploymentPublic | None:
        """The deployment running now, if any."""
        with self.database.read_session() as session:
            row = session.exec(select(Deployment).where(col(Deployment.active).is_(True))).first()
            return _public(row) if row is not None else None

    def history(self, limit: int = 50, version: str | None = None) -> list[DeploymentPublic]:
        """Deployments, newest first (of ``version`` only, when given)."""
        query = select(Deployment).order_by(col(Deployment.started_at).desc()).limit(limit)
        if version is not None:
            query = query.where(col(Deployment.version) == version)
        with self.database.read_session() as session:
            return [_public(row) for row in session.exec(query)]

    def start(self, request: DeploymentCreate, actor: str) -> DeploymentPublic:
        """Deploy ``request.version`` as a shadow or canary, ending the active challenger as replaced."""
        mode = _mode(request.mode)
        what = "--sample" if mode is DeploymentMode.SHADOW else "--share"
        if not 0 < request.share <= 1:
            raise DeploymentError(f"{what} must be above 0 and at most 1 (a share of requests), got {request.share}")
        if self.registry is None:
            raise DeploymentError("deploying a challenger needs the model registry")
        self.registry.get(request.version)
        champion = self.registry.champion()
        if champion == request.version:
            raise DeploymentError(
                f"{request.version} is the champion already: deploy another version beside it "
                "(`flywheel models list` shows them)"
            )
        try:
            with self.database.session() as session:
                replaced = self._end_active(
                    session,
                    DeploymentOutcome.REPLACED,
                    actor,
                    f"replaced by a {mode} of {request.version} at {request.share:.0%}",
                )
                row = Deployment(
                    version=request.version,
                    mode=mode,
                    share=request.share,
                    champion_version=champion,
                    run_id=request.run_id,
                    feedback_ids=request.feedback_ids,
                    started_by=actor,
                )
                session.add(row)
                AuditLog.add(
                    session,
                    actor,
                    f"model.{mode}",
                    request.version,
                    share=request.share,
                    champion=champion,
                    replaced=replaced.version if replaced else None,
                    run=request.run_id,
                )
                session.flush()
                started = _public(row)
        except IntegrityError as exc:
            raise DeploymentError(
                "another challenger was deployed at the same moment; see `flywheel models challengers` and retry"
            ) from exc
        logger.info("%s of %s at %.0f%% started by %s", mode, request.version, request.share * 100, actor)
        return started

    def end(
        self,
        version: str,
        mode: DeploymentMode,
        outcome: DeploymentOutcome,
        *,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> DeploymentPublic:
        """End the active ``mode`` deployment of ``version``; DeploymentError naming what runs when it is not."""
        active = self.active()
        if active is None or active.version != version or active.mode != mode:
            running = f"the active challenger is a {active.mode} of {active.version}" if active else "none is active"
            raise DeploymentError(f"{version} is not deployed as a {mode}: {running}")
        with self.database.session() as session:
            ended = self._end(session, active.deployment_id, outcome, actor=actor, reason=reason, evidence=evidence)
        if ended is None:
            raise DeploymentError(f"the {mode} of {version} ended meanwhile; `flywheel models challengers` says how")
        return ended

    def finish_promoted(self, version: str, actor: str) -> DeploymentPublic | None:
        """End the active deployment of ``version`` as promoted, once the pointer names it; None when it had none."""
        active = self.active()
        if active is None or active.version != version:
            return None
        with self.database.session() as session:
            return self._end(
                session, active.deployment_id, DeploymentOutcome.PROMOTED, actor=actor, reason="promoted to champion"
            )

    def end_in(
        self,
        session: Session,
        deployment_id: str,
        outcome: DeploymentOutcome,
        *,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> DeploymentPublic | None:
        """End a deployment inside the caller's transaction (with what else records the decision); None when it had
        ended already."""
        return self._end(session, deployment_id, outcome, actor=actor, reason=reason, evidence=evidence)

    def review_canary(self, settings: Settings) -> CanaryComparison | None:
        """Withdraw the active canary when, over at least ``FLYWHEEL_CANARY_MIN_LABELLED`` labelled requests on each
        side, its accuracy is more than ``FLYWHEEL_CANARY_MAX_ACCURACY_DROP`` below the champion's over the same
        period; the figures it was judged on, None without an active canary."""
        active = self.active()
        if active is None or active.mode != DeploymentMode.CANARY:
            return None
        figures = canary_comparison(self.database, active.version, active)
        why = canary_verdict(figures, settings)
        if why is not None:
            with self.database.session() as session:
                self._end(
                    session,
                    active.deployment_id,
                    DeploymentOutcome.WITHDRAWN,
                    actor=CANARY_ACTOR,
                    reason=why,
                    evidence=_evidence(figures),
                )
            logger.warning("canary %s withdrawn: %s", active.version, why)
        return figures

    def expire_shadow_predictions(self, retention_days: float) -> int:
        """Delete shadow predictions older than ``retention_days``; the deployments keep their figures."""
        cutoff = utcnow() - timedelta(days=retention_days)
        with self.database.session() as session:
            result = session.execute(delete(ShadowPrediction).where(col(ShadowPrediction.created_at) < cutoff))
            removed = int(getattr(result, "rowcount", 0) or 0)
        if removed:
            logger.info("deleted %d shadow predictions older than %g days", removed, retention_days)
        return removed

    def _end_active(
        self, session: Session, outcome: DeploymentOutcome, actor: str, reason: str
    ) -> DeploymentPublic | None:
        row = session.exec(select(Deployment).where(col(Deployment.active).is_(True))).first()
        return self._end(session, row.deployment_id, outcome, actor=actor, reason=reason) if row else None

    def _end(
        self,
        session: Session,
        deployment_id: str,
        outcome: DeploymentOutcome,
        *,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
    ) -> DeploymentPublic | None:
        row = session.get(Deployment, deployment_id, with_for_update=True)
        if row is None or row.ended_at is not None:
            return None
        if evidence is None:
            evidence = _evidence(compare(self.database, _public(row)))
        row.active, row.ended_at, row.ended_by = None, utcnow(), actor
        row.outcome, row.reason, row.evidence = outcome, reason[:MAX_REASON_CHARS], evidence
        AuditLog.add(
            session,
            actor,
            f"model.{row.mode}.{outcome}",
            row.version,
            reason=reason[:500],
            deployment=row.deployment_id,
        )
        session.flush()
        logger.info("%s of %s ended (%s) by %s: %s", row.mode, row.version, outcome, actor, reason)
        return _public(row)


def canary_verdict(figures: CanaryComparison, settings: Settings) -> str | None:
    """Why the canary must be withdrawn, or None while it may go on (or there are too few labels to judge)."""
    canary, champion = figures.canary, figures.champion
    needed = settings.canary_min_labelled
    if canary.labelled < needed or champion.labelled < needed or canary.accuracy is None or champion.accuracy is None:
        return None
    drop = champion.accuracy - canary.accuracy
    if drop <= settings.canary_max_accuracy_drop:
        return None
    return (
        f"its accuracy on trusted feedback for the requests it answered, {canary.accuracy:.1%} of {canary.labelled}, "
        f"is {drop * 100:.1f} points below the champion's {champion.accuracy:.1%} of {champion.labelled} over the "
        f"same period (FLYWHEEL_CANARY_MAX_ACCURACY_DROP allows {settings.canary_max_accuracy_drop * 100:.1f})"
    )


def _mode(value: str) -> DeploymentMode:
    try:
        return DeploymentMode(value)
    except ValueError:
        raise DeploymentError(f"unknown mode {value!r}: use shadow or canary") from None
