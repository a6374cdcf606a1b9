"""The prediction path of one service worker: the champion kept loaded (hot reload) and the micro-batcher."""

from __future__ import annotations

import logging
import math
import os

from flywheel.admission import Throughput
from flywheel.metrics import admission_metrics
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from service.batcher import BatchResult, MicroBatcher
from service.champion import ChampionWatcher, ServedModel
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

#: Texts per forward pass on CPU unless configured: measured fastest for MiniLM on 2 cores (activations fit in cache).
CPU_FORWARD_BATCH = 16


def worker_threads(settings: Settings) -> int:
    """Torch threads of one worker: the configured number, else this process's cores split between the workers."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, len(os.sched_getaffinity(0)) // settings.serve_workers)


class ModelServer:
    """Loads the champion, follows promotions, and batches concurrent requests into forward passes."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: ServiceMetrics) -> None:
        import torch

        self.metrics = metrics
        #: Texts per second of inference, measured on the traffic served: what admission control sizes its bound by.
        self.throughput = Throughput()
        dropped = admission_metrics().dropped
        self.watcher = ChampionWatcher(settings, registry, on_swap=self._on_swap)
        self.batcher = MicroBatcher(
            lambda: self.watcher.current,
            max_batch_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            forward_batch_size=settings.inference_batch_size
            or (settings.batch_max_size if torch.cuda.is_available() else CPU_FORWARD_BATCH),
            observer=self._observe_batch,
            on_drop=lambda reason: dropped.labels(route="predict", reason=reason).inc(),
        )

    def start(self) -> ModelServer:
        """Load the champion now (if there is one), then start hot reload and the batcher's thread."""
        self.watcher.check()
        if self.watcher.current is None:
            logger.warning("no champion model yet; /predict answers 503 until one is promoted")
        self.watcher.start()
        self.batcher.start()
        return self

    def stop(self) -> None:
        """Stop reloading and batching."""
        self.watcher.stop()
        self.batcher.stop()

    @property
    def current(self) -> ServedModel | None:
        """The loaded model new requests use; None before the first champion has loaded."""
        return self.watcher.current

    def entry(self) -> ModelVersion | None:
        """Registry entry of the model served now (what other packages' routes need to know)."""
        current = self.watcher.current
        return current.entry if current is not None else None

    async def predict(self, texts: list[str], deadline: float = math.inf) -> BatchResult:
        """Probabilities for ``texts``, computed in a batch shared with concurrent requests before ``deadline``."""
        return await self.batcher.submit(texts, deadline)

    def alive(self) -> bool:
        """True while the batcher's thread runs."""
        return self.batcher.alive()

    def _observe_batch(self, texts: int, requests: int, seconds: float) -> None:
        self.metrics.observe_batch(texts, requests, seconds)
        self.throughput.observe(texts, seconds)

    def _on_swap(self, loaded: ServedModel, previous: ServedModel | None) -> None:
        self.metrics.observe_swap(loaded.version, previous.version if previous else None)
