"""Helpers of the shadow and canary tests: challenger versions made from the tiny champion, the served app with an
ingestor beside it, and waiting for what the ingestor stored."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from sqlmodel import col, select

from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.models.deployment import ShadowPrediction
from flywheel.models.feedback import Prediction
from flywheel.network import HEAD_FILE
from flywheel.registry import ModelRegistry
from tests.conftest import app_client, copy_home, settings_from, wait_until
from tests.feedback.conftest import running_ingestor
from tests.flywheel.model_files import register_copy
from tests.service.conftest import FAST_ENV

ADMIN_TOKEN = "challenger-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def register_swapped(registry: ModelRegistry) -> str:
    """A confident but wrong challenger: the champion with the two rows of its label head exchanged, so it gives
    every text the other label with the champion's confidence."""
    version = register_copy(registry)
    head = registry.get(version).model_dir / HEAD_FILE
    weights = load_file(str(head))
    save_file({name: tensor.flip(0).contiguous() for name, tensor in weights.items()}, str(head))
    return version


@dataclass
class Stack:
    """The in-process app of a home, its feedback store (and database), and an ingestor storing what it logs."""

    env: dict[str, str]
    client: TestClient
    store: FeedbackStore
    registry: ModelRegistry

    @property
    def database(self) -> Database:
        return self.store.database

    def stored(self, prediction_ids: list[str]) -> dict[str, Prediction]:
        """The live prediction rows of these ids."""
        with self.database.read_session() as session:
            query = select(Prediction).where(col(Prediction.prediction_id).in_(prediction_ids))
            return {row.prediction_id: row for row in session.exec(query)}

    def shadows(self, prediction_ids: list[str]) -> dict[str, ShadowPrediction]:
        """The shadow rows of these ids."""
        with self.database.read_session() as session:
            query = select(ShadowPrediction).where(col(ShadowPrediction.prediction_id).in_(prediction_ids))
            return {row.prediction_id: row for row in session.exec(query)}

    def wait_stored(self, prediction_ids: list[str]) -> dict[str, Prediction]:
        """Wait until the ingestor stored these live predictions."""
        wait_until(lambda: len(self.stored(prediction_ids)) == len(prediction_ids), what="predictions ingested")
        return self.stored(prediction_ids)

    def predict(self, texts: list[str], client_id: str | None = None) -> list[dict[str, object]]:
        headers = {"X-Client-Id": client_id} if client_id else None
        response = self.client.post("/predict", json={"texts": texts}, headers=headers)
        assert response.status_code == 200, response.text
        return list(response.json()["predictions"])


@contextmanager
def challenger_stack(
    trained_home: dict[str, str], broker: EmbeddedBroker, directory: Path, **env: str
) -> Iterator[Stack]:
    """A copy of the trained home served in-process, wired to ``broker``, with an ingestor of its own group."""
    full = {
        **copy_home(trained_home, directory / "home"),
        **FAST_ENV,
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_INGEST_GROUP_ID": f"challengers-{directory.name}",
        "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0",
        # Embedding stored predictions would load the real base model beside the tiny one.
        "FLYWHEEL_DRIFT_EMBED_AT_INGEST": "false",
        "FLYWHEEL_INGEST_MAX_POLL_INTERVAL_MS": "2000",
        **env,
    }
    settings = settings_from(full)
    database = Database.from_settings(settings).start()
    store = FeedbackStore(database, settings)
    try:
        with app_client(full) as client, running_ingestor(store, group=full["FLYWHEEL_INGEST_GROUP_ID"]):
            yield Stack(full, client, store, ModelRegistry(settings))
    finally:
        database.dispose()
