"""The served model and hot reload: follow the registry's champion pointer and swap models without a restart."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from flywheel.classifier import Classifier
from flywheel.errors import FlywheelError
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from service.schemas import ModelInfo

logger = logging.getLogger(__name__)

#: Seconds before a version that failed to load is tried again.
RETRY_FAILED_SECONDS = 30.0
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

    def info(self) -> ModelInfo:
        """What /model reports."""
        card = self.entry.card
        return ModelInfo(
            version=self.version,
            labels=self.labels,
            holdout_metrics=card.holdout_metrics,
            loaded_at=self.loaded_at,
            created_at=card.created_at,
            base_model=card.base_model,
            parent_version=card.parent_version,
            max_length=self.classifier.max_length,
            device=str(self.classifier.device),
            # Read from the weights: a plain torch module (not a Hugging Face model) has no ``dtype`` attribute.
            dtype=str(next(self.classifier.model.parameters()).dtype).removeprefix("torch."),
        )


class ChampionWatcher:
    """Keeps the champion loaded; a background thread polls the pointer and swaps in a newly promoted model."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        on_swap: Callable[[ServedModel, ServedModel | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.on_swap = on_swap
        self._current: ServedModel | None = None
        self._seen: tuple[int, int, int] | None = None
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedModel | None:
        """The model new batches use; None until a champion exists and has loaded."""
        return self._current

    def check(self) -> None:
        """Load the champion if the pointer changed since the last check (or a failed load is due a retry)."""
        try:
            stat = self.registry.pointer_path.stat()
        except FileNotFoundError:
            return
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key == self._seen and (self._retry_at == 0.0 or time.monotonic() < self._retry_at):
            return
        try:
            version = self.registry.champion()
        except (OSError, ValidationError) as exc:
            logger.warning("cannot read the champion pointer %s: %s", self.registry.pointer_path, exc)
            return
        current = self._current
        if version is None or (current is not None and current.version == version):
            self._seen, self._retry_at = key, 0.0
            return
        try:
            loaded = self._load(version)
        except (FlywheelError, OSError, ValueError, RuntimeError) as exc:
            logger.error(
                "cannot load champion %s, still serving %s; retrying in %.0fs: %s",
                version,
                current.version if current else "nothing",
                RETRY_FAILED_SECONDS,
                exc,
            )
            self._seen, self._retry_at = key, time.monotonic() + RETRY_FAILED_SECONDS
            return
        self._seen, self._retry_at = key, 0.0
        self._swap(loaded)

    def _load(self, version: str) -> ServedModel:
        started = time.perf_counter()
        entry = self.registry.get(version)
        classifier = Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=entry.version)
        # A first forward pass here, not on a live request, and proof that the model runs before it serves.
        classifier.predict_proba([PROBE_TEXT])
        logger.info("loaded model %s in %.1fs", version, time.perf_counter() - started)
        return ServedModel(classifier, entry)

    def _swap(self, loaded: ServedModel) -> None:
        previous = self._current
        # One reference assignment: a batch reads it once, so every request sees exactly one model.
        self._current = loaded
        logger.info("now serving model %s (was %s)", loaded.version, previous.version if previous else "nothing")
        if self.on_swap is not None:
            self.on_swap(loaded, previous)
        on_gpu = previous is not None and previous.classifier.device.type == "cuda"
        del previous
        # The old weights are freed once the batch still using them finishes; collect promptly.
        gc.collect()
        if on_gpu:
            import torch

            torch.cuda.empty_cache()

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
