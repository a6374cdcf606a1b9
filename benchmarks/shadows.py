"""The shadow challenger of the serving benchmark: a second version deployed as a shadow beside the champion, and
the wait until a server scores requests with it."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from servers import Server

from flywheel.database import Database
from flywheel.deployments import DeploymentError, DeploymentStore
from flywheel.events import PredictionEvent, Topic, decode
from flywheel.models.deployment import DeploymentCreate, DeploymentMode, DeploymentOutcome
from flywheel.registry import MODEL_SUBDIR, TRAINING_DATA_FILE, ModelRegistry, ModelVersion
from flywheel.settings import Settings


def shadow_version(entry: ModelVersion, home: Path) -> str:
    """A second version holding the champion's files: as a shadow it costs one more pass of the same model."""

    def write(path: Path) -> None:
        shutil.copytree(entry.model_dir, path / MODEL_SUBDIR, dirs_exist_ok=True)
        shutil.copy(entry.training_data_path, path / TRAINING_DATA_FILE)

    card = entry.card.model_copy(update={"parent_version": entry.version})
    return ModelRegistry(Settings(home=home)).save(card, write).version


@contextlib.contextmanager
def shadow_deployed(home: Path, version: str, sample: float) -> Iterator[str]:
    """``version`` deployed as a shadow on ``sample`` of the requests of the home's servers while the block runs;
    yields its deployment id, and stops it afterwards (a ``--home`` is left as it was found)."""
    settings = Settings(home=home)
    database = Database(settings.resolved_database_url).start()
    store = DeploymentStore(database, ModelRegistry(settings))
    try:
        started = store.start(DeploymentCreate(version=version, mode=DeploymentMode.SHADOW, share=sample), "bench")
        yield started.deployment_id
    finally:
        with contextlib.suppress(DeploymentError):
            store.end(version, DeploymentMode.SHADOW, DeploymentOutcome.STOPPED, actor="bench", reason="bench done")
        database.dispose()


def wait_shadowing(server: Server, bootstrap: str, deployment_id: str, timeout: float = 180.0) -> None:
    """Send requests until the server logs a shadow prediction of ``deployment_id`` (it has loaded the shadow)."""
    import httpx
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(Topic.PREDICTIONS.value, p)
            for p in sorted(consumer.partitions_for_topic(Topic.PREDICTIONS.value) or {0})
        ]
        consumer.assign(partitions)
        consumer.seek_to_end(*partitions)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=30) as http:
            while time.monotonic() < deadline:
                http.post("/predict", json={"text": "a film worth the wait"})
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        event = decode(Topic.PREDICTIONS, record.value)
                        if (
                            isinstance(event, PredictionEvent)
                            and event.shadow is not None
                            and event.shadow.deployment_id == deployment_id
                        ):
                            return
        raise TimeoutError(f"the service logged no shadow prediction of {deployment_id} in {timeout:.0f}s")
    finally:
        consumer.close()
