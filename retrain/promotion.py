"""Promotion of a retrain run's challenger, safe against concurrent changes of the champion and against crashes.

The database and the champion pointer (a file) cannot change in one transaction, so promotion takes three steps,
and every crash between them leaves a state that recovery settles consistently:

1. One database transaction renews the run's lease, marks the labels the challenger learned from as used, and sets
   the run PROMOTING. A crash before it commits changes nothing; recovery fails the run.
2. Under the pointer's lock: a compare-and-swap from the champion the run started from, right after renewing the
   lease once more (in the database). A crash before the pointer is written leaves the run PROMOTING and the
   pointer without the challenger: recovery accepts the labels again and fails the run.
3. One transaction sets the run PROMOTED and writes the audit entry. A crash before it leaves the run PROMOTING
   and the pointer naming the challenger: recovery records the promotion.

Recovery runs only while holding the lease, and under the pointer's lock: a worker that stalled past its lease
between steps 1 and 2 and then resumes finds the lease gone in step 2, so it cannot swap the pointer after
another worker settled its run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session, col, select

from flywheel.access import AuditLog
from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.errors import FlywheelError, RegistryError
from flywheel.events import utcnow
from flywheel.labels import LabelLedger
from flywheel.models.feedback import Feedback, FeedbackStatus
from flywheel.models.retrain import RetrainRun, RunStatus
from flywheel.registry import ChampionChangedError, ModelRegistry, ModelVersion
from retrain.lease import LeaseLostError, RetrainLock

logger = logging.getLogger(__name__)

ACTIVE = (RunStatus.RUNNING, RunStatus.PROMOTING)
#: Who the audit log names for the worker's promotions.
ACTOR = "retrain-worker"


class RunNotFoundError(FlywheelError):
    """No retrain run has that id."""


@dataclass(frozen=True)
class StartingPoint:
    """What a run starts from: the champion the pointer names, and the model the run measures challengers against."""

    #: The pointer's champion when the run started: the promotion's compare-and-swap expects it still.
    expected: str
    #: The champion, or the newest loadable earlier champion when the champion cannot be loaded.
    baseline: ModelVersion
    #: For the run's reason: why ``baseline`` is not ``expected`` ("" when it is).
    note: str = ""


def starting_point(registry: ModelRegistry) -> StartingPoint:
    """The champion if it loads, else the newest earlier champion that does (what the service serves then too)."""
    pointer = registry.pointer()
    if pointer.champion is None:
        raise RegistryError("no champion model yet: run `flywheel train --data PATH` first")
    refused: list[str] = []
    for version in pointer.fallbacks:
        try:
            entry = registry.get(version)
            Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=entry.version)
        except Exception as exc:
            # A truncated or corrupt model raises whatever its loader raises (safetensors, torch, JSON, OS errors).
            logger.error("model %s cannot be loaded (%s: %s)", version, type(exc).__name__, exc, exc_info=exc)
            refused.append(f"{version}: {type(exc).__name__}: {exc}"[:300])
            continue
        if not refused:
            return StartingPoint(pointer.champion, entry)
        logger.warning(
            "champion %s cannot be loaded; this run measures challengers against %s, the newest loadable earlier "
            "champion", pointer.champion, version,
        )
        note = (
            f"; champion {pointer.champion} cannot be loaded, so the run measured against {version}, the newest "
            f"loadable earlier champion (refused {'; '.join(refused)})"
        )
        return StartingPoint(pointer.champion, entry, note)
    raise RegistryError(
        f"no champion can be loaded ({'; '.join(refused)}); train and promote a new one with "
        "`flywheel train --data PATH --promote`"
    )


class Promoter:
    """Promotes a run's challenger in the three steps above and settles runs a dead worker left behind."""

    def __init__(self, database: Database, registry: ModelRegistry, lock: RetrainLock) -> None:
        self.database = database
        self.registry = registry
        self.lock = lock

    def promote(
        self,
        run_id: str,
        *,
        challenger: str,
        expected: str,
        feedback_ids: Sequence[str],
        reason: str,
        started: float,
    ) -> RunStatus:
        """Make ``challenger`` champion in place of ``expected``, for the gate's ``reason``; returns the run's final
        status (PROMOTING only if the pointer was swapped but that could not be recorded: the next recovery does)."""
        attempt = _Attempt(run_id, challenger, expected, reason, started)
        current = self.registry.champion()
        if current != expected:
            return self._give_up(attempt, RunStatus.REJECTED, self._moved(expected, current))
        try:
            with self.database.session() as session:
                self.lock.confirm(session)
                marked = LabelLedger.mark_used_in(session, feedback_ids, challenger)
                row = _row(session, run_id)
                row.status, row.heartbeat_at = RunStatus.PROMOTING, utcnow()
        except LeaseLostError as exc:
            return self._give_up(attempt, RunStatus.FAILED, str(exc))
        logger.info("retrain run %s: promoting %s (%d labels marked used)", run_id, challenger, marked)
        try:
            self.registry.promote(challenger, reason=f"retrain run {run_id}", expected=expected, guard=self._guard)
        except ChampionChangedError as exc:
            return self._give_up(attempt, RunStatus.REJECTED, self._moved(expected, exc.actual))
        except LeaseLostError as exc:
            return self._give_up(attempt, RunStatus.FAILED, str(exc))
        except Exception as exc:
            logger.exception("retrain run %s: promoting %s failed", run_id, challenger)
            return self._give_up(attempt, RunStatus.FAILED, f"promotion of {challenger} failed: {exc}")
        return self._record_promoted(attempt)

    def recover(self) -> int:
        """Settle runs left active by a worker that died or stalled past its lease, and accept again any labels
        still marked used by a challenger that never became champion; call only while holding the lease."""
        if not self._anything_to_settle():
            return 0
        with self.registry.locked() as pointer, self.database.session() as session:
            promoted = pointer.promoted
            fixed = 0
            for row in session.exec(select(RetrainRun).where(col(RetrainRun.status).in_(ACTIVE))):
                if row.status == RunStatus.PROMOTING and row.challenger_version in promoted:
                    row.status, row.reason = RunStatus.PROMOTED, "promoted; the worker stopped before recording it"
                    AuditLog.add(
                        session, ACTOR, "model.promote", row.challenger_version,
                        previous=row.champion_version, run=row.run_id, recovered=True,
                    )
                elif row.status == RunStatus.PROMOTING:
                    row.status = RunStatus.FAILED
                    row.reason = (
                        f"worker {row.worker} stopped while promoting {row.challenger_version}; the champion was not "
                        "changed and the labels it trained on are accepted again for the next retrain"
                    )
                else:
                    row.status = RunStatus.FAILED
                    row.reason = f"worker {row.worker} stopped during the run; the champion was not changed"
                row.finished_at = utcnow()
                fixed += 1
            returned = LabelLedger.unmark_in(session, _stranded(session, promoted))
        if fixed or returned:
            logger.warning(
                "recovered %d interrupted retrain runs; %d labels of challengers never promoted accepted again",
                fixed, returned,
            )
        return fixed

    def _anything_to_settle(self) -> bool:
        # Without this, every run would take the pointer's lock just to find nothing to do.
        with self.database.read_session() as session:
            if session.exec(select(RetrainRun.run_id).where(col(RetrainRun.status).in_(ACTIVE))).first():
                return True
            return bool(_stranded(session, self.registry.pointer().promoted))

    def _guard(self) -> None:
        # Right before the pointer is written, under its lock: renewing the lease now fences off any other worker
        # for the lease's length, far longer than the write takes.
        with self.database.session() as session:
            self.lock.confirm(session)

    def _record_promoted(self, attempt: _Attempt) -> RunStatus:
        try:
            with self.database.session() as session:
                _finish(_row(session, attempt.run_id), RunStatus.PROMOTED, attempt.reason, attempt.started)
                AuditLog.add(
                    session, ACTOR, "model.promote", attempt.challenger, previous=attempt.expected, run=attempt.run_id
                )
        except Exception:
            # The pointer names the challenger already: the run stays PROMOTING and recovery records it.
            logger.exception(
                "retrain run %s promoted %s but could not record it; the next run records it",
                attempt.run_id, attempt.challenger,
            )
            return RunStatus.PROMOTING
        logger.info("retrain run %s: %s — %s", attempt.run_id, RunStatus.PROMOTED, attempt.reason)
        return RunStatus.PROMOTED

    def _give_up(self, attempt: _Attempt, status: RunStatus, why: str) -> RunStatus:
        """End the run without promoting and accept its labels again, unless the pointer names the challenger after
        all (an error after the pointer was written): that is recorded as the promotion it is."""
        with self.registry.locked() as pointer:
            if attempt.challenger in pointer.promoted:
                return self._record_promoted(attempt)
            with self.database.session() as session:
                LabelLedger.unmark_in(session, [attempt.challenger])
                _finish(_row(session, attempt.run_id), status, why[:1000], attempt.started)
        logger.warning("retrain run %s: %s — %s", attempt.run_id, status, why)
        return status

    @staticmethod
    def _moved(expected: str, current: str | None) -> str:
        return (
            f"the champion changed during the run: it started from {expected}, the pointer now names "
            f"{current or 'no model'} (a promotion or rollback meanwhile), so the challenger was not promoted and "
            "its labels stay available; run `flywheel retrain now` to retrain against the current champion"
        )


@dataclass(frozen=True)
class _Attempt:
    run_id: str
    challenger: str
    expected: str
    #: The gate's reason, for the run once promoted.
    reason: str
    #: ``time.monotonic()`` when the run started, for its duration.
    started: float


def _row(session: Session, run_id: str) -> RetrainRun:
    row = session.get(RetrainRun, run_id)
    if row is None:
        raise RunNotFoundError(f"retrain run {run_id} disappeared from the database; `flywheel runs` lists the runs")
    return row


def _finish(row: RetrainRun, status: RunStatus, reason: str, started: float) -> None:
    row.status, row.reason = status, reason
    row.finished_at = row.heartbeat_at = utcnow()
    row.duration_seconds = round(time.monotonic() - started, 2)


def _stranded(session: Session, promoted: set[str]) -> list[str]:
    """Challengers of runs that did not promote whose labels are still marked used."""
    unpromoted = select(RetrainRun.challenger_version).where(
        col(RetrainRun.status) != RunStatus.PROMOTED, col(RetrainRun.challenger_version).is_not(None)
    )
    query = select(Feedback.used_by_version).distinct().where(
        col(Feedback.status) == FeedbackStatus.USED, col(Feedback.used_by_version).in_(unpromoted)
    )
    return sorted(str(version) for version in session.exec(query) if version not in promoted)
