"""The whole loop on one machine: embedded broker, first model, service, ingestion and worker, supervised."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from flywheel.broker import wait_for_port
from flywheel.database import Database
from flywheel.http import wait_until_ready
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from stack.supervisor import Supervisor

logger = logging.getLogger(__name__)

SEED_DATA = Path(__file__).parent / "data" / "seed_reviews.csv"


class LocalStack:
    """``flywheel up``: everything a newcomer needs, with no configuration."""

    def __init__(
        self, settings: Settings, port: int, broker_port: int, data: Path | None, train_minutes: float
    ) -> None:
        self.external_kafka = "FLYWHEEL_KAFKA_BOOTSTRAP" in os.environ
        bootstrap = settings.kafka_bootstrap if self.external_kafka else f"127.0.0.1:{broker_port}"
        self.settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        self.port = port
        self.broker_port = broker_port
        self.data = data
        self.train_minutes = train_minutes
        self.supervisor = Supervisor(settings.home / "run" / "up.json")

    def ensure_model(self) -> None:
        """Train and promote a first model when the registry has no champion."""
        registry = ModelRegistry(self.settings)
        if registry.champion() is not None:
            self.supervisor.say("up", f"serving champion {registry.champion()}")
            return
        from retrain.data import load_dataset
        from retrain.pipeline import TrainingPipeline

        path = self.data or SEED_DATA
        self.supervisor.say("up", f"no model yet: training a first one on {path} (at most {self.train_minutes:g} min)")
        settings = self.settings.model_copy(update={"max_train_minutes": self.train_minutes})
        raw = load_dataset(path, settings.text_column, settings.label_column)
        outcome = TrainingPipeline(settings, registry).run(raw, promote=True)
        metrics = outcome.holdout_metrics
        self.supervisor.say(
            "up",
            f"model {outcome.version.version} trained: holdout accuracy {metrics.accuracy:.3f}, "
            f"macro-F1 {metrics.macro_f1:.3f}",
        )

    def run(self) -> None:
        """Start everything, print the URLs, and supervise until SIGTERM or Ctrl-C."""
        stop_requested = False

        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            nonlocal stop_requested
            stop_requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        env = {
            **os.environ,
            "FLYWHEEL_HOME": str(self.settings.home),
            "FLYWHEEL_KAFKA_BOOTSTRAP": self.settings.kafka_bootstrap,
            "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(self.settings.bentoml_home)),
            "PYTHONUNBUFFERED": "1",
        }
        flywheel = [sys.executable, "-m", "stack"]
        try:
            if not self.external_kafka:
                self.supervisor.add("broker", [*flywheel, "broker", "--port", str(self.broker_port)], env)
                wait_for_port("127.0.0.1", self.broker_port, timeout=30)
            # The service, ingestion and worker only check that the schema is at head; migrate once, here.
            database = Database.from_settings(self.settings)
            try:
                database.upgrade()
            finally:
                database.dispose()
            self.supervisor.say("up", f"database {database.display_url} migrated (flywheel db upgrade)")
            self.ensure_model()
            serve = [*flywheel, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
            self.supervisor.add("service", serve, env)
            self.supervisor.add("ingest", [*flywheel, "ingest"], env)
            self.supervisor.add("worker", [*flywheel, "worker"], env)
            self._wait_ready(lambda: stop_requested)
            self.supervisor.watch(until=lambda: stop_requested)
        finally:
            self.supervisor.stop()
            self.supervisor.say("up", "stopped")

    def _wait_ready(self, stop_requested: Callable[[], bool]) -> None:
        url = f"http://127.0.0.1:{self.port}"
        # The supervisor restarts a crashing service, so only time (or Ctrl-C) ends this wait.
        wait_until_ready(url, timeout=300, stop=stop_requested, context=lambda: "See its log lines above.")
        if stop_requested():
            return
        for line in (
            f"Flywheel is up. API: {url}  (docs: {url}/docs)",
            f"drift reports: {url}/drift   metrics: {url}/metrics   retrain history: {url}/retrain/runs",
            "Kafka: " + self.settings.kafka_bootstrap + ("" if self.external_kafka else " (embedded tansu, dev only)"),
            "Keys: without any, callers on this machine are anonymous clients with reviewer reads. Create one with "
            "`flywheel keys create NAME --role client|annotator|reviewer|admin`; from then on every route needs one.",
            "Ctrl-C stops everything.",
        ):
            self.supervisor.say("up", line)



