"""The challenger served beside the champion: the deployment table's active shadow or canary, loaded in the runtime
the champion's loading chooses, and followed as the champion pointer is (every ``FLYWHEEL_RELOAD_INTERVAL`` seconds).

A challenger that fails to load is logged and tried again with backoff, never fatal: the champion keeps serving
every request meanwhile. While the database is unreachable the worker keeps the challenger it has, so an outage
changes no caller's model.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from flywheel.database import BackgroundDatabase, DatabaseError
from flywheel.deployments import DeploymentStore, answers_caller
from flywheel.models.deployment import DeploymentMode, DeploymentPublic
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from service.champion import RETRY_FAILED_SECONDS, RETRY_MAX_SECONDS, ServedModel, collect, load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Challenger:
    """A deployed challenger and its loaded model; immutable, so a batch holding it sees one deployment."""

    deployment: DeploymentPublic
    model: ServedModel

    @property
    def version(self) -> str:
        """Registry version."""
        return self.model.version

    @property
    def shadow(self) -> bool:
        """True for a shadow (scores a sample, answers nobody), False for a canary."""
        return self.deployment.mode == DeploymentMode.SHADOW

    def answers(self, key: str | None) -> bool:
        """Whether this canary answers the caller routed by ``key`` (its client id, else its principal)."""
        return key is not None and answers_caller(self.deployment, key)

    def samples(self) -> bool:
        """Whether this shadow also scores the next request: a random draw at the deployment's sample share."""
        return random.random() < self.deployment.share


class ChallengerWatcher:
    """Keeps the active deployment's challenger loaded; a background thread polls the deployment table."""

    def __init__(self, settings: Settings, registry: ModelRegistry, database: BackgroundDatabase) -> None:
        self.settings = settings
        self.registry = registry
        self.database = database
        self._current: Challenger | None = None
        self._failed: tuple[str, int, float] | None = None
        self._unreachable = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Challenger | None:
        """The challenger new batches use; None when none is deployed (or it has not loaded)."""
        return self._current

    def check(self) -> None:
        """Follow the deployment table: load a newly deployed challenger, drop an ended one."""
        try:
            active = DeploymentStore(self.database.get()).active()
        except (DatabaseError, SQLAlchemyError) as exc:
            if not self._unreachable:
                logger.warning(
                    "cannot read the deployed challenger (%s); keeping the one loaded", str(exc).splitlines()[0]
                )
            self._unreachable = True
            return
        self._unreachable = False
        current = self._current
        if active is None:
            if current is not None:
                self._replace(None)
            return
        if current is not None and current.version == active.version:
            if current.deployment != active:
                self._current = Challenger(active, current.model)
                logger.info("challenger %s is now a %s at %.0f%%", active.version, active.mode, active.share * 100)
            return
        if self._failed is not None and self._failed[0] == active.version and time.monotonic() < self._failed[2]:
            return
        try:
            model = load_model(self.registry, self.settings, active.version)
        except Exception as exc:
            attempts = self._failed[1] + 1 if self._failed and self._failed[0] == active.version else 1
            delay = min(RETRY_MAX_SECONDS, RETRY_FAILED_SECONDS * 2 ** (attempts - 1))
            self._failed = (active.version, attempts, time.monotonic() + delay)
            logger.error(
                "cannot load challenger %s (%s: %s); the champion answers every request, trying again in %.0fs",
                active.version,
                type(exc).__name__,
                exc,
                delay,
                exc_info=exc,
            )
            return
        self._failed = None
        self._replace(Challenger(active, model))

    def _replace(self, challenger: Challenger | None) -> None:
        previous = self._current
        self._current = challenger
        if challenger is not None:
            logger.info(
                "challenger %s loaded as a %s at %.0f%%",
                challenger.version,
                challenger.deployment.mode,
                challenger.deployment.share * 100,
            )
        else:
            logger.info(
                "challenger %s ended; the champion answers every request", previous.version if previous else "-"
            )
        on_gpu = previous is not None and previous.model.classifier.device.type == "cuda"
        del previous
        collect(on_gpu)

    def start(self) -> ChallengerWatcher:
        """Poll the deployment table every ``reload_interval`` seconds in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="challenger-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reload_interval):
            try:
                self.check()
            except Exception:
                # Whatever went wrong, the next poll tries again; the champion serves meanwhile.
                logger.exception("challenger check failed")
