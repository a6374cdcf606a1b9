"""Drift without re-embedding: ingestion stores each text's drift embedding once, reports read them.

Real broker, real databases, the tiny base model as the drift encoder; nothing of ours is replaced.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete
from sqlmodel import col, func, select

from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.embedding import PredictionEmbedder, stored_embeddings
from flywheel.encoder import DriftEncoder, from_bytes
from flywheel.events import PredictionEvent, encode, utcnow
from flywheel.models.drift import PredictionEmbedding
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from monitoring.monitor import DriftMonitor
from monitoring.window import WindowReader
from tests.conftest import copy_home, free_port, scratch_database_url, wait_until
from tests.feedback.conftest import prediction, produce, running_ingestor
from tests.monitoring.conftest import same_texts

ROWS = 240


def home_settings(trained_home: dict[str, str], home: Path, database_url: str, **overrides: object) -> Settings:
    """Settings of a private copy of the trained home (its tiny base model is the drift encoder) on a database."""
    env = copy_home(trained_home, home)
    values: dict[str, object] = {k.removeprefix("FLYWHEEL_").lower(): v for k, v in env.items()}
    values.update(
        database_url=database_url,
        drift_targeted_labels=0,
        ingest_max_poll_interval_ms=2000,
        ingest_retry_max_seconds=1.0,
        database_ready_timeout=10.0,
        **overrides,
    )
    return Settings.model_validate(values)


def embedding_rows(database: Database) -> list[PredictionEmbedding]:
    """Every stored drift embedding."""
    with database.read_session() as session:
        return list(session.exec(select(PredictionEmbedding)))


def count_embeddings(database: Database) -> int:
    """Stored drift embeddings."""
    with database.read_session() as session:
        return int(session.exec(select(func.count()).select_from(PredictionEmbedding)).one())


@pytest.fixture()
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test alone, so its predictions topic holds only this test's events."""
    embedded = EmbeddedBroker(port=free_port()).start()
    yield embedded
    embedded.stop()


@pytest.fixture()
def sqlite_home(trained_home: dict[str, str], tmp_path: Path) -> Iterator[tuple[Settings, Database]]:
    """A private trained home on a fresh, migrated SQLite database."""
    with scratch_database_url("sqlite", tmp_path) as url:
        settings = home_settings(trained_home, tmp_path / "home", url)
        database = Database(url)
        yield settings, database
        database.dispose()


def logged(monitor: DriftMonitor, texts: list[str]) -> list[PredictionEvent]:
    """The champion's real predictions of ``texts``, as the service logs them."""
    entry = monitor.registry.champion_version()
    classifier = monitor.classifier(entry)
    positive = classifier.predict_proba(texts).probs[:, classifier.labels.index("positive")]
    pairs = zip(texts, positive, strict=True)
    return [prediction(text, round(float(p), 6), version=entry.version) for text, p in pairs]


def store_window(monitor: DriftMonitor, texts: list[str]) -> list[str]:
    """Store the champion's predictions of ``texts`` as ingestion does; returns their ids."""
    assert monitor.database is not None
    events = logged(monitor, texts)
    now = utcnow()
    FeedbackStore(monitor.database, monitor.settings).ingest([prediction_row(event, now) for event in events])
    return [event.prediction_id for event in events]


def embed_in_background(settings: Settings, database: Database, rows: int) -> None:
    """Run the ingestion process's embedder until ``rows`` predictions have an embedding."""
    stop = threading.Event()
    embedder = PredictionEmbedder(settings, database, stop).start()
    try:
        wait_until(lambda: count_embeddings(database) >= rows, 120, "background drift embedding")
    finally:
        stop.set()
        embedder.supervisor.join(30)


def copy_version(registry: ModelRegistry, entry: ModelVersion) -> ModelVersion:
    """A new registry version with the files of ``entry``, as a retrain would save its challenger."""
    card = entry.card.model_copy(update={"parent_version": entry.version})

    def write(path: Path) -> None:
        shutil.copytree(entry.model_dir, path / "model", dirs_exist_ok=True)
        shutil.copy(entry.training_data_path, path / entry.training_data_path.name)

    return registry.save(card, write)


def test_ingestion_stores_each_embedding_once_and_compact(
    trained_home: dict[str, str], tmp_path: Path, database_url: str, own_broker: EmbeddedBroker
) -> None:
    settings = home_settings(trained_home, tmp_path / "home", database_url, kafka_bootstrap=own_broker.bootstrap)
    database = Database(database_url).upgrade()
    try:
        store = FeedbackStore(database, settings)
        events = [prediction(text, 0.8, version="v1") for text in same_texts(40)]
        payloads = [encode(event) for event in events]
        with running_ingestor(store, group="embed-once") as ingestor:
            produce(own_broker.bootstrap, payloads)
            wait_until(lambda: count_embeddings(database) >= len(events), 60, "embeddings of ingested predictions")
            # Re-delivered events change nothing: one embedding per prediction and encoder.
            produce(own_broker.bootstrap, payloads)
            wait_until(lambda: ingestor.stats.duplicates >= len(events), 60, "re-delivered events")
            assert ingestor.embedder is not None
            assert ingestor.embedder.supervisor.health().up
        rows = embedding_rows(database)
        encoder = DriftEncoder.load(settings)
        assert len(rows) == len(events)
        assert {row.prediction_id for row in rows} == {event.prediction_id for event in events}
        assert {row.encoder for row in rows} == {encoder.encoder_id}
        # float16: two bytes a dimension.
        assert all(row.dims == encoder.dims and len(row.vector) == 2 * encoder.dims for row in rows)
        stored = stored_embeddings(database, encoder.encoder_id, [event.prediction_id for event in events])
        vectors = from_bytes([stored[event.prediction_id] for event in events], encoder.dims)
        expected = encoder.embed([event.text for event in events])
        np.testing.assert_allclose(vectors, expected, rtol=1e-2, atol=1e-3)
    finally:
        database.dispose()


def test_report_reads_stored_embeddings_instead_of_embedding(sqlite_home: tuple[Settings, Database]) -> None:
    settings, database = sqlite_home
    monitor = DriftMonitor(settings, database=database)
    ids = store_window(monitor, same_texts(ROWS))
    embed_in_background(settings, database, len(ids))

    stored = monitor.run()

    assert stored.verdict == "no_drift", stored.message
    assert stored.current_rows == ROWS
    assert (stored.embeddings_stored, stored.embeddings_computed) == (ROWS, 0)
    assert stored.drift_encoder == monitor.encoder().encoder_id

    # The same window read without its embeddings: the report embeds every text itself, to the same verdict.
    window = WindowReader(database).load(settings.drift_window_hours, settings.drift_window_max_rows)
    embedded = monitor.evaluate(window).summary
    assert (embedded.embeddings_stored, embedded.embeddings_computed) == (0, ROWS)
    assert embedded.verdict == stored.verdict


def test_promotion_keeps_the_embedding_space_and_the_window(sqlite_home: tuple[Settings, Database]) -> None:
    settings, database = sqlite_home
    monitor = DriftMonitor(settings, database=database)
    old = monitor.registry.champion_version()
    store_window(monitor, same_texts(ROWS))
    embed_in_background(settings, database, ROWS)
    before = monitor.run()

    new = copy_version(monitor.registry, old)
    monitor.registry.promote(new.version, reason="test")
    after = monitor.run()

    assert after.model_version == new.version != before.model_version
    assert after.drift_encoder == before.drift_encoder
    # The window logged by the old champion is still the window, read from the store, nothing re-embedded.
    assert after.current_rows == ROWS
    assert (after.embeddings_stored, after.embeddings_computed) == (ROWS, 0)
    assert after.served_rows == 0
    assert after.verdict == "no_drift", after.message
    # The new version's reference texts were embedded once already, under the same encoder.
    classifier = monitor.classifier(new)
    assert monitor.references.load(new, classifier, monitor.encoder()).embedded == 0


def test_predictions_whose_embedding_failed_or_is_missing_are_embedded_by_the_report(
    trained_home: dict[str, str], tmp_path: Path, own_broker: EmbeddedBroker
) -> None:
    with scratch_database_url("sqlite", tmp_path) as url:
        # An ingestor whose drift encoder cannot load: it still stores every prediction.
        broken = home_settings(
            trained_home,
            tmp_path / "home",
            url,
            kafka_bootstrap=own_broker.bootstrap,
            base_model=str(tmp_path / "no-such-model"),
        )
        database = Database(url)
        try:
            working = broken.model_copy(update={"base_model": trained_home["FLYWHEEL_BASE_MODEL"]})
            monitor = DriftMonitor(working, database=database)
            events = logged(monitor, same_texts(ROWS))
            with running_ingestor(FeedbackStore(database, broken), group="embed-broken") as ingestor:
                produce(own_broker.bootstrap, [encode(event) for event in events])
                wait_until(lambda: ingestor.stats.inserted >= ROWS, 60, "ingestion without an encoder")
                assert ingestor.embedder is not None
                wait_until(lambda: not ingestor.embedder.supervisor.health().up, 30, "embedder fault")
            assert count_embeddings(database) == 0

            first = monitor.run()
            assert first.current_rows == ROWS
            assert (first.embeddings_stored, first.embeddings_computed) == (0, ROWS)
            assert first.verdict == "no_drift", first.message

            # The report stored what it embedded; a row deleted since is embedded again, and only that one.
            lost = [event.prediction_id for event in events[:25]]
            with database.session() as session:
                session.execute(delete(PredictionEmbedding).where(col(PredictionEmbedding.prediction_id).in_(lost)))
            second = monitor.run()
            assert second.current_rows == ROWS
            assert (second.embeddings_stored, second.embeddings_computed) == (ROWS - 25, 25)
            assert second.verdict == first.verdict
        finally:
            database.dispose()
