"""The prediction path of one service worker: the champion kept loaded (hot reload), the challenger deployed beside
it (shadow or canary, see ``service.challenger``) and the micro-batcher."""

from __future__ import annotations

import logging
import math
import os

from flywheel.admission import Throughput
from flywheel.database import BackgroundDatabase
from flywheel.metrics import admission_metrics
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from service.batcher import BatchResult, MicroBatcher, ShadowSink
from service.challenger import Challenger, ChallengerWatcher
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
    """Loads the champion, follows promotions and the deployed challenger, and batches concurrent requests into
    forward passes."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: ServiceMetrics) -> None:
        import torch

        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        #: Follows the deployment table once the worker's database is handed over (``follow_challengers``).
        self.challengers: ChallengerWatcher | None = None
        #: Texts per second of inference, measured on the traffic served: what admission control sizes its bound by.
        forward_batch = settings.inference_batch_size or (
            settings.batch_max_size if torch.cuda.is_available() else CPU_FORWARD_BATCH
        )
        # The admission bound's rate: of batches at least one forward pass big (see Throughput).
        self.throughput = Throughput(full=min(forward_batch, settings.admission_min_texts))
        dropped = admission_metrics().dropped
        self.watcher = ChampionWatcher(settings, registry, on_swap=self._on_swap)
        self.batcher = MicroBatcher(
            lambda: self.watcher.current,
            current_challenger=lambda: self.challenger,
            max_batch_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            forward_batch_size=forward_batch,
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

    def follow_challengers(self, database: BackgroundDatabase) -> None:
        """Load the challenger the deployment table of ``database`` names, and follow it (once per worker)."""
        if self.challengers is None:
            self.challengers = ChallengerWatcher(self.settings, self.registry, database).start()

    def stop(self) -> None:
        """Stop reloading and batching."""
        self.watcher.stop()
        if self.challengers is not None:
            self.challengers.stop()
        self.batcher.stop()

    @property
    def current(self) -> ServedModel | None:
        """The loaded model new requests use; None before the first champion has loaded."""
        return self.watcher.current

    @property
    def challenger(self) -> Challenger | None:
        """The loaded challenger new batches use, if one is deployed."""
        return self.challengers.current if self.challengers is not None else None

    def entry(self) -> ModelVersion | None:
        """Registry entry of the model served now (what other packages' routes need to know)."""
        current = self.watcher.current
        return current.entry if current is not None else None

    async def predict(
        self,
        texts: list[str],
        deadline: float = math.inf,
        *,
        route_key: str | None = None,
        on_shadow: ShadowSink | None = None,
    ) -> BatchResult:
        """Probabilities for ``texts``, computed in a batch shared with concurrent requests before ``deadline``; a
        canary answers them when it draws ``route_key``, and a shadow sampling them hands ``on_shadow`` its scores."""
        return await self.batcher.submit(texts, deadline, route_key=route_key, on_shadow=on_shadow)

    def alive(self) -> bool:
        """True while the batcher's thread runs."""
        return self.batcher.alive()

    def _observe_batch(self, texts: int, requests: int, seconds: float) -> None:
        self.metrics.observe_batch(texts, requests, seconds)
        self.throughput.observe(texts, seconds)

    def _on_swap(self, loaded: ServedModel, previous: ServedModel | None) -> None:
        self.metrics.observe_swap(loaded.version, previous.version if previous else None)
