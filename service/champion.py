"""The served model and hot reload: follow the registry's champion pointer and swap models without a restart."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flywheel.classifier import Classifier
from flywheel.metrics import champion_metrics
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.runtime import load_classifier
from flywheel.settings import Settings
from service.schemas import ModelInfo, RefusedModel

logger = logging.getLogger(__name__)

#: Seconds before a champion that failed to load is tried again, doubled after each further failure up to the most.
RETRY_FAILED_SECONDS = 30.0
RETRY_MAX_SECONDS = 600.0
#: Classified by every model before it serves, and by the batcher to tell a broken model from a poison request.
PROBE_TEXT = "warm up"


@dataclass(frozen=True)
class ServedModel:
    """A loaded classifier with its registry entry; immutable, so a batch holding it sees one consistent model."""

    classifier: Classifier
    entry: ModelVersion
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def version(self) -> str:
        """Registry version."""
        return self.entry.version

    @property
    def labels(self) -> list[str]:
        """Label names in score order."""
        return self.classifier.labels

    def info(self, champion: str | None = None, refused: RefusedModel | None = None) -> ModelInfo:
        """What /model reports: this model, and the pointer's champion with the refusal when it is another."""
        card = self.entry.card
        return ModelInfo(
            version=self.version,
            champion=champion or self.version,
            fallback=refused is not None and refused.version == champion and champion != self.version,
            refused=refused,
            labels=self.labels,
            holdout_metrics=card.holdout_metrics,
            loaded_at=self.loaded_at,
            created_at=card.created_at,
            base_model=card.base_model,
            parent_version=card.parent_version,
            max_length=self.classifier.max_length,
            device=str(self.classifier.device),
            dtype=self.classifier.dtype,
            runtime=self.classifier.runtime,
        )


def load_model(registry: ModelRegistry, settings: Settings, version: str) -> ServedModel:
    """``version`` loaded in its runtime (see ``flywheel.runtime``), proven to classify before it serves."""
    started = time.perf_counter()
    entry = registry.get(version)
    classifier = load_classifier(entry, settings)
    # A first forward pass here, not on a live request, and proof that the model runs before it serves.
    classifier.predict_proba([PROBE_TEXT])
    logger.info("loaded model %s in %.1fs", version, time.perf_counter() - started)
    return ServedModel(classifier, entry)


def collect(on_gpu: bool) -> None:
    """Free the weights of a model just dropped (once the batch still using it finishes), promptly."""
    gc.collect()
    if on_gpu:
        import torch

        torch.cuda.empty_cache()


class ChampionWatcher:
    """Keeps the champion loaded; a background thread polls the pointer and swaps in a newly promoted model.

    A champion that fails to load (a truncated or corrupt file) is refused, never fatal: the worker keeps serving
    what it serves, or, when it has nothing yet, the newest earlier champion that loads; it reports the refusal
    (log, ``flywheel_champion_*`` metrics, ``GET /model``) and tries again with backoff and on every pointer change.
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        on_swap: Callable[[ServedModel, ServedModel | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.on_swap = on_swap
        self.metrics = champion_metrics()
        self._current: ServedModel | None = None
        self._champion: str | None = None
        self._refused: RefusedModel | None = None
        self._seen: tuple[int, int, int] | None = None
        self._retry_at = 0.0
        self._paused_until = 0.0
        self._faults = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedModel | None:
        """The model new batches use; None until a champion exists and has loaded."""
        return self._current

    def info(self) -> ModelInfo | None:
        """What /model reports; None while nothing is served."""
        current = self._current
        return current.info(self._champion, self._refused) if current is not None else None

    def unavailable(self) -> str:
        """Why nothing is served, for the 503 of /model."""
        refused = self._refused
        if refused is None:
            return "no champion model loaded yet: train and promote one first"
        return (
            f"no model can be served: champion {refused.version} fails to load ({refused.reason}) and no earlier "
            "champion loads either; promote a loadable version (`flywheel models list`, `flywheel models promote "
            "VERSION`)"
        )

    def check(self) -> None:
        """Load the champion if the pointer changed since the last check (or a failed load is due a retry).

        Never raises: an unexpected error is logged and checks pause with backoff, so hot reload outlives it.
        """
        if time.monotonic() < self._paused_until:
            return
        try:
            self._check()
        except Exception:
            self._faults += 1
            pause = min(RETRY_MAX_SECONDS, self.settings.reload_interval * 2**self._faults)
            logger.exception("hot reload check failed; checking again in %.0fs", pause)
            self._paused_until = time.monotonic() + pause
        else:
            self._faults = 0

    def _check(self) -> None:
        try:
            stat = self.registry.pointer_path.stat()
        except FileNotFoundError:
            return
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key == self._seen and (self._retry_at == 0.0 or time.monotonic() < self._retry_at):
            return
        try:
            pointer = self.registry.pointer()
        except (OSError, ValueError) as exc:
            logger.warning("cannot read the champion pointer %s: %s", self.registry.pointer_path, exc)
            return
        self._seen = key
        version = self._champion = pointer.champion
        current = self._current
        if version is None or (current is not None and current.version == version):
            self._retry_at = 0.0
            self._clear_refusal()
            return
        try:
            loaded = self._load(version)
        except Exception as exc:
            delay = self._refuse(version, exc)
            logger.error(
                "cannot load champion %s (%s: %s); %s; trying again in %.0fs or when the pointer changes",
                version,
                type(exc).__name__,
                exc,
                f"still serving {current.version}" if current else "serving nothing yet",
                delay,
                exc_info=exc,
            )
            if self._current is None:
                self._fall_back(pointer.fallbacks[1:], version)
            return
        self._retry_at = 0.0
        self._clear_refusal()
        self._swap(loaded)

    def _refuse(self, version: str, exc: Exception) -> float:
        """Record that ``version`` failed to load; returns the seconds until it is tried again."""
        previous = self._refused
        attempts = previous.attempts + 1 if previous is not None and previous.version == version else 1
        if previous is not None and previous.version != version:
            self.metrics.clear(previous.version)
        delay = min(RETRY_MAX_SECONDS, RETRY_FAILED_SECONDS * 2 ** (attempts - 1))
        self._refused = RefusedModel(
            version=version,
            reason=f"{type(exc).__name__}: {exc}"[:500],
            refused_at=datetime.now(UTC),
            attempts=attempts,
        )
        self._retry_at = time.monotonic() + delay
        self.metrics.failed(version)
        self.metrics.refuse(version)
        return delay

    def _fall_back(self, earlier: list[str], refused: str) -> None:
        """Serve the newest earlier champion that loads (a worker starting while the champion is broken)."""
        for version in earlier:
            try:
                loaded = self._load(version)
            except Exception as exc:
                self.metrics.failed(version)
                logger.error("cannot load earlier champion %s either (%s: %s)", version, type(exc).__name__, exc,
                             exc_info=exc)
                continue
            logger.warning(
                "champion %s cannot be loaded; falling back to %s, the newest earlier champion that loads, until %s "
                "loads or another version is promoted", refused, version, refused,
            )
            self._swap(loaded)
            return
        logger.error("no champion can be loaded (%s, then %s); /predict answers 503", refused,
                     ", ".join(earlier) or "no earlier champion")

    def _clear_refusal(self) -> None:
        if self._refused is not None:
            self.metrics.clear(self._refused.version)
            self._refused = None

    def _load(self, version: str) -> ServedModel:
        return load_model(self.registry, self.settings, version)

    def _swap(self, loaded: ServedModel) -> None:
        previous = self._current
        # One reference assignment: a batch reads it once, so every request sees exactly one model.
        self._current = loaded
        logger.info("now serving model %s (was %s)", loaded.version, previous.version if previous else "nothing")
        if self.on_swap is not None:
            self.on_swap(loaded, previous)
        on_gpu = previous is not None and previous.classifier.device.type == "cuda"
        del previous
        collect(on_gpu)

    def start(self) -> ChampionWatcher:
        """Poll the pointer every ``reload_interval`` seconds in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """True while the polling thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reload_interval):
            self.check()
