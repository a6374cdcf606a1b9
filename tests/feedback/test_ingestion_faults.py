"""The ingest loop survives a fault it did not expect (its table renamed away under it), shows it, and recovers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import func
from sqlmodel import select

from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.events import encode
from flywheel.models.feedback import Prediction
from tests.conftest import wait_until
from tests.feedback.conftest import prediction, produce, running_ingestor, stored_ids

pytestmark = pytest.mark.slow


def _rename(store: FeedbackStore, old: str, new: str) -> None:
    with store.database.session() as session:
        session.connection().exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")


def _count(store: FeedbackStore) -> int:
    with store.database.read_session() as session:
        return int(session.exec(select(func.count()).select_from(Prediction)).one())


def test_ingest_survives_its_table_vanishing_and_stores_everything_once_it_is_back(
    store_factory: Callable[..., FeedbackStore], private_broker: EmbeddedBroker
) -> None:
    store = store_factory(kafka_bootstrap=private_broker.bootstrap)
    events = [prediction(f"review {i}", 0.8) for i in range(50)]
    with running_ingestor(store) as ingestor:
        produce(private_broker.bootstrap, [encode(event) for event in events[:20]])
        wait_until(lambda: _count(store) == 20, what="the first 20 rows")

        _rename(store, "prediction", "prediction_moved")
        try:
            produce(private_broker.bootstrap, [encode(event) for event in events[20:]])
            wait_until(lambda: not ingestor.supervisor.health().up, what="the fault shown")
            assert "prediction" in ingestor.supervisor.health().detail
            assert ingestor.registry.get_sample_value("flywheel_thread_up", {"thread": "ingest"}) == 0
            assert (ingestor.registry.get_sample_value("flywheel_thread_faults_total", {"thread": "ingest"}) or 0) >= 1
        finally:
            _rename(store, "prediction_moved", "prediction")

        wait_until(lambda: _count(store) == 50, timeout=60, what="every event stored once the table is back")
        wait_until(lambda: ingestor.supervisor.health().up, what="the fault cleared")
        assert ingestor.registry.get_sample_value("flywheel_thread_up", {"thread": "ingest"}) == 1
    assert sorted(stored_ids(store)) == sorted(event.prediction_id for event in events), "each once"
