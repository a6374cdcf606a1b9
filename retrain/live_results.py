"""What the model page says of each version's shadow and canary phases: read from the deployment table, with the
figures of an active phase compared now and those an ended phase kept when it ended."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from flywheel.comparison import CanaryComparison, ShadowComparison, compare
from flywheel.database import Database
from flywheel.deployments import DeploymentStore
from flywheel.models.deployment import DeploymentMode, DeploymentPublic
from retrain.model_history import LiveResult

#: Deployments read per page: the newest ones, each version's phases among them.
MAX_DEPLOYMENTS = 200


def deployment_results(database: Database, versions: Sequence[str]) -> dict[str, list[LiveResult]]:
    """Each shown version's shadow and canary phases, newest first."""
    shown = set(versions)
    results: dict[str, list[LiveResult]] = {}
    for deployment in DeploymentStore(database).history(limit=MAX_DEPLOYMENTS):
        if deployment.version in shown:
            results.setdefault(deployment.version, []).append(_result(database, deployment))
    return results


def _result(database: Database, deployment: DeploymentPublic) -> LiveResult:
    figures = _figures(database, deployment)
    state = "active" if deployment.ended_at is None else f"{deployment.outcome} by {deployment.ended_by}"
    title = (
        f"{deployment.mode} on {deployment.share:.0%} of {'requests' if deployment.mode == 'shadow' else 'callers'}"
        f" since {deployment.started_at:%Y-%m-%d %H:%M} UTC beside {deployment.champion_version or '-'} ({state})"
    )
    rows: list[tuple[str, str]] = []
    if isinstance(figures, ShadowComparison):
        rows += [
            ("shadowed requests", str(figures.rows)),
            ("agreement with the served label", _share(figures.agreement)),
            ("confidence shift", "-" if figures.confidence_shift is None else f"{figures.confidence_shift:+.3f}"),
            ("labelled requests", str(figures.feedback.labelled)),
            (
                "accuracy served / shadow",
                f"{_share(figures.feedback.served_accuracy)} / {_share(figures.feedback.challenger_accuracy)}",
            ),
        ]
    elif isinstance(figures, CanaryComparison):
        rows += [
            ("requests champion / canary", f"{figures.champion.requests} / {figures.canary.requests}"),
            ("labelled champion / canary", f"{figures.champion.labelled} / {figures.canary.labelled}"),
            ("accuracy champion / canary", f"{_share(figures.champion.accuracy)} / {_share(figures.canary.accuracy)}"),
        ]
    if deployment.reason:
        rows.append(("why it ended", deployment.reason))
    return LiveResult(title, rows)


def _figures(database: Database, deployment: DeploymentPublic) -> ShadowComparison | CanaryComparison | None:
    """The phase's figures: compared now while active, else as kept at its end (its rows may have expired since)."""
    if deployment.ended_at is None or not deployment.evidence:
        return compare(database, deployment)
    kind = ShadowComparison if deployment.mode == DeploymentMode.SHADOW else CanaryComparison
    try:
        return kind.model_validate({**deployment.evidence, "deployment": deployment})
    except ValidationError:
        return None


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
