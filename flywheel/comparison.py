"""A challenger compared with the served model on live traffic: a shadow over its shadow window, a canary over the
period it answered.

Counts and means are aggregated by the database, so a long window costs one pass over its rows. Accuracy is judged
as the retrain gate judges: on labels of trusted principals or confirmed by a reviewer (accepted or used), given on
the requests themselves (the labels' ``prediction_id``). Where principals disagree about a request, the label most of
them gave counts; a tie leaves the request out, since it cannot say which model is right.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, computed_field
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from sqlalchemy import case, func
from sqlmodel import col, select

from flywheel.database import Database
from flywheel.errors import FlywheelError
from flywheel.events import utcnow
from flywheel.labels import trusted_label
from flywheel.models.deployment import Deployment, DeploymentMode, DeploymentPublic, ShadowPrediction
from flywheel.models.feedback import Feedback, FeedbackStatus, Prediction

#: Statuses of the labels that judge a challenger.
JUDGING_STATUSES = (FeedbackStatus.ACCEPTED, FeedbackStatus.USED)


class ComparisonError(FlywheelError):
    """There is nothing to compare: the version was never deployed that way."""


class LabelShare(BaseModel):
    """One label's share of the window: as the served model answered and as the challenger did."""

    label: str
    served: int
    challenger: int
    served_share: float
    challenger_share: float


class Accuracy(BaseModel):
    """Both sides judged on the labelled requests of the window."""

    #: Requests with a label people agree on.
    labelled: int
    #: Requests whose labels are tied between two or more answers: left out.
    conflicting: int
    served_correct: int
    challenger_correct: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def served_accuracy(self) -> float | None:
        """Share of labelled requests the served model got right; None without any."""
        return self.served_correct / self.labelled if self.labelled else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def challenger_accuracy(self) -> float | None:
        """Share of labelled requests the challenger got right; None without any."""
        return self.challenger_correct / self.labelled if self.labelled else None


class ShadowComparison(BaseModel):
    """A shadow challenger against the served model on the requests it shadowed."""

    deployment: DeploymentPublic
    until: datetime
    #: Shadowed requests (rows) in the window.
    rows: int
    #: Of them, where the challenger gave the served label.
    agreed: int
    served_confidence: float | None
    challenger_confidence: float | None
    #: Requests of the window by the version that answered them, most first.
    served_by: dict[str, int]
    labels: list[LabelShare]
    feedback: Accuracy

    @computed_field  # type: ignore[prop-decorator]
    @property
    def agreement(self) -> float | None:
        """Share of shadowed requests on which the challenger agrees with the served label; None without rows."""
        return self.agreed / self.rows if self.rows else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def confidence_shift(self) -> float | None:
        """The challenger's mean confidence in its label minus the served model's in its own."""
        if self.served_confidence is None or self.challenger_confidence is None:
            return None
        return round(self.challenger_confidence - self.served_confidence, 6)

    def render(self) -> RenderableType:
        """The comparison as the terminal shows it."""
        d = self.deployment
        served = ", ".join(f"{version} {count}" for version, count in self.served_by.items()) or "-"
        lines = [
            f"shadow of {d.version} on {d.share:.0%} of requests, {_period(d, self.until)}",
            f"rows: {self.rows} shadowed requests; served by {served}",
        ]
        if self.agreement is None:
            lines.append("no shadow predictions stored yet: send traffic, and keep `flywheel ingest` running")
        else:
            lines.append(f"agreement with the served label: {self.agreement:.1%} ({self.agreed}/{self.rows})")
            lines.append(
                f"mean confidence: served {self.served_confidence:.3f}, shadow {self.challenger_confidence:.3f} "
                f"({self.confidence_shift:+.3f})"
            )
        parts: list[RenderableType] = [Text("\n".join(lines)), _label_table(self.labels, "shadow")]
        parts.append(
            _accuracy_table(
                self.feedback.labelled,
                self.feedback.conflicting,
                [("served", self.feedback.served_correct), ("shadow", self.feedback.challenger_correct)],
            )
        )
        return Group(*parts)


class CanarySide(BaseModel):
    """The requests one side answered in the canary's period, and how it did on the labelled ones."""

    requests: int
    labelled: int
    conflicting: int
    correct: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def accuracy(self) -> float | None:
        """Share of its labelled requests it got right; None without any."""
        return self.correct / self.labelled if self.labelled else None


class CanaryComparison(BaseModel):
    """A canary against the rest of the traffic (the champion's) over the same period."""

    deployment: DeploymentPublic
    until: datetime
    canary: CanarySide
    champion: CanarySide
    #: ``served`` is the champion's side, ``challenger`` the canary's, each over the requests it answered.
    labels: list[LabelShare]

    def render(self) -> RenderableType:
        """The comparison as the terminal shows it."""
        d = self.deployment
        table = Table("answered by", "requests", "labelled", "correct", "accuracy", title="on trusted feedback")
        for name, side in (("champion", self.champion), (f"canary {d.version}", self.canary)):
            accuracy = f"{side.accuracy:.1%}" if side.accuracy is not None else "-"
            table.add_row(name, str(side.requests), str(side.labelled), str(side.correct), accuracy)
        head = Text(f"canary of {d.version} answering {d.share:.0%} of callers, {_period(d, self.until)}")
        return Group(head, table, _label_table(self.labels, "canary"))


def deployment_of(database: Database, version: str, mode: DeploymentMode | None = None) -> DeploymentPublic:
    """The latest deployment of ``version`` (of ``mode``, when given), active or ended."""
    query = select(Deployment).where(col(Deployment.version) == version)
    if mode is not None:
        query = query.where(col(Deployment.mode) == mode)
    with database.read_session() as session:
        row = session.exec(query.order_by(col(Deployment.started_at).desc())).first()
    if row is None:
        what = "in shadow" if mode is DeploymentMode.SHADOW else "a canary" if mode else "a challenger"
        raise ComparisonError(
            f"model {version} was never {what}: deploy it with `flywheel models shadow {version}` or "
            f"`flywheel models canary {version} --share 0.1`"
        )
    return DeploymentPublic.model_validate(row, from_attributes=True)


def shadow_comparison(database: Database, version: str, deployment: DeploymentPublic | None = None) -> ShadowComparison:
    """``version`` as a shadow (its latest shadow deployment, or ``deployment``) against what was served."""
    deployment = deployment or deployment_of(database, version, DeploymentMode.SHADOW)
    where = col(ShadowPrediction.deployment_id) == deployment.deployment_id
    with database.read_session() as session:
        rows, agreed, challenger_confidence, served_confidence = session.exec(
            select(
                func.count(),
                func.coalesce(
                    func.sum(case((col(ShadowPrediction.label) == col(ShadowPrediction.served_label), 1), else_=0)), 0
                ),
                func.avg(ShadowPrediction.confidence),
                func.avg(ShadowPrediction.served_confidence),
            ).where(where)
        ).one()
        ours = _counts(
            session.exec(
                select(ShadowPrediction.label, func.count()).where(where).group_by(col(ShadowPrediction.label))
            )
        )
        theirs = _counts(
            session.exec(
                select(ShadowPrediction.served_label, func.count())
                .where(where)
                .group_by(col(ShadowPrediction.served_label))
            )
        )
        served_by = _counts(
            session.exec(
                select(ShadowPrediction.served_version, func.count())
                .where(where)
                .group_by(col(ShadowPrediction.served_version))
            )
        )
        labelled = session.exec(
            select(
                ShadowPrediction.prediction_id, Feedback.label, ShadowPrediction.served_label, ShadowPrediction.label
            )
            .join(Feedback, col(Feedback.prediction_id) == col(ShadowPrediction.prediction_id))
            .where(where, col(Feedback.status).in_(JUDGING_STATUSES), trusted_label())
        ).all()
    truth, conflicting = _consensus((prediction_id, label) for prediction_id, label, _, _ in labelled)
    answers = {prediction_id: (served, shadow) for prediction_id, _, served, shadow in labelled}
    return ShadowComparison(
        deployment=deployment,
        until=deployment.ended_at or utcnow(),
        rows=int(rows),
        agreed=int(agreed),
        served_confidence=_mean(served_confidence),
        challenger_confidence=_mean(challenger_confidence),
        served_by=dict(Counter(served_by).most_common()),
        labels=_shares(theirs, ours),
        feedback=Accuracy(
            labelled=len(truth),
            conflicting=conflicting,
            served_correct=sum(answers[key][0] == label for key, label in truth.items()),
            challenger_correct=sum(answers[key][1] == label for key, label in truth.items()),
        ),
    )


def canary_comparison(database: Database, version: str, deployment: DeploymentPublic | None = None) -> CanaryComparison:
    """``version`` as a canary (its latest canary deployment, or ``deployment``) against the rest of the traffic
    over the same period."""
    deployment = deployment or deployment_of(database, version, DeploymentMode.CANARY)
    until = deployment.ended_at or utcnow()
    window = (col(Prediction.created_at) >= deployment.started_at, col(Prediction.created_at) <= until)
    canary = (col(Prediction.model_version) == version).label("canary")
    with database.read_session() as session:
        counts = session.exec(
            select(canary, Prediction.label, func.count()).where(*window).group_by(canary, col(Prediction.label))
        ).all()
        labelled = session.exec(
            select(Prediction.prediction_id, canary, Prediction.label, Feedback.label)
            .join(Feedback, col(Feedback.prediction_id) == col(Prediction.prediction_id))
            .where(*window, col(Feedback.status).in_(JUDGING_STATUSES), trusted_label())
        ).all()
    sides: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}
    for is_canary, label, count in counts:
        sides[bool(is_canary)][label] += int(count)
    truth, _ = _consensus((prediction_id, given) for prediction_id, _, _, given in labelled)
    answered = {prediction_id: (bool(is_canary), label) for prediction_id, is_canary, label, _ in labelled}
    conflicted = {prediction_id for prediction_id, *_ in labelled} - truth.keys()

    def side(is_canary: bool) -> CanarySide:
        mine = {key: label for key, label in truth.items() if answered[key][0] is is_canary}
        return CanarySide(
            requests=sum(sides[is_canary].values()),
            labelled=len(mine),
            conflicting=sum(answered[key][0] is is_canary for key in conflicted),
            correct=sum(answered[key][1] == label for key, label in mine.items()),
        )

    return CanaryComparison(
        deployment=deployment,
        until=until,
        canary=side(True),
        champion=side(False),
        labels=_shares(sides[False], sides[True]),
    )


def comparison(database: Database, version: str) -> ShadowComparison | CanaryComparison:
    """The latest deployment of ``version``, shadow or canary, compared as its mode compares."""
    return compare(database, deployment_of(database, version))


def compare(database: Database, deployment: DeploymentPublic) -> ShadowComparison | CanaryComparison:
    """``deployment`` compared as its mode compares."""
    if deployment.mode == DeploymentMode.SHADOW:
        return shadow_comparison(database, deployment.version, deployment)
    return canary_comparison(database, deployment.version, deployment)


def _period(deployment: DeploymentPublic, until: datetime) -> str:
    """When it ran, beside which champion, and how it ended."""
    span = f"{deployment.started_at:%Y-%m-%d %H:%M} – {until:%Y-%m-%d %H:%M} UTC"
    state = f"{deployment.outcome}: {deployment.reason}" if deployment.ended_at else "active"
    return f"{span}, champion {deployment.champion_version or '-'} ({state})"


def _label_table(labels: list[LabelShare], challenger: str) -> Table:
    table = Table("label", "served", challenger, "shift (points)", title="label shares")
    for share in labels:
        table.add_row(
            share.label,
            f"{share.served_share:.1%} ({share.served})",
            f"{share.challenger_share:.1%} ({share.challenger})",
            f"{(share.challenger_share - share.served_share) * 100:+.1f}",
        )
    return table


def _accuracy_table(labelled: int, conflicting: int, sides: list[tuple[str, int]]) -> RenderableType:
    if not labelled:
        return Text("accuracy: no trusted feedback has arrived for these requests yet")
    note = f" ({conflicting} with tied labels left out)" if conflicting else ""
    table = Table("model", "correct", "accuracy", title=f"on {labelled} requests people labelled{note}")
    for name, correct in sides:
        table.add_row(name, str(correct), f"{correct / labelled:.1%}")
    return table


def _consensus(labels: Iterable[tuple[str, str]]) -> tuple[dict[str, str], int]:
    """The label most principals gave each request, and how many requests were left out for a tie."""
    given: dict[str, Counter[str]] = {}
    for key, label in labels:
        given.setdefault(key, Counter())[label] += 1
    truth = {}
    for key, counts in given.items():
        (first, n), *rest = counts.most_common(2)
        if not rest or rest[0][1] < n:
            truth[key] = first
    return truth, len(given) - len(truth)


def _counts(rows: Iterable[tuple[str, int]]) -> Counter[str]:
    return Counter({label: int(count) for label, count in rows})


def _shares(served: Counter[str], challenger: Counter[str]) -> list[LabelShare]:
    """Every label either side gave, most served first, with its share of each side's requests."""
    served_total, challenger_total = sum(served.values()), sum(challenger.values())
    names = sorted(set(served) | set(challenger), key=lambda name: (-served[name], -challenger[name], name))
    return [
        LabelShare(
            label=name,
            served=served[name],
            challenger=challenger[name],
            served_share=served[name] / served_total if served_total else 0.0,
            challenger_share=challenger[name] / challenger_total if challenger_total else 0.0,
        )
        for name in names
    ]


def _mean(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)
