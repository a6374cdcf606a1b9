"""Every prediction is logged to the flywheel.predictions topic, read back by a real Kafka consumer."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from flywheel.broker import EmbeddedBroker
from flywheel.events import PredictionEvent, Topic
from tests.conftest import read_topic

pytestmark = pytest.mark.slow


def test_every_prediction_is_published_with_its_details(client: TestClient, broker: EmbeddedBroker) -> None:
    sent = []
    for texts in (["a lovely film"], ["terrible acting", "great cast", "poor story"]):
        body = {"text": texts[0]} if len(texts) == 1 else {"texts": texts}
        response = client.post("/predict", json=body, headers={"X-Client-ID": "checkout-page"})
        assert response.status_code == 200
        sent += list(zip(texts, response.json()["predictions"], strict=True))
    anonymous = client.post("/predict", json={"text": "no client id"}).json()["predictions"][0]
    wanted = {p["prediction_id"] for _, p in sent} | {anonymous["prediction_id"]}

    def logged(events: list) -> list[PredictionEvent]:
        return [e for e in events if isinstance(e, PredictionEvent) and e.prediction_id in wanted]

    events = logged(read_topic(broker.bootstrap, Topic.PREDICTIONS, lambda evs: len(logged(evs)) >= len(wanted)))
    by_id = {e.prediction_id: e for e in events}
    assert len(events) == len(by_id) == len(wanted), "each prediction logged exactly once"
    for text, prediction in sent:
        event = by_id[prediction["prediction_id"]]
        assert event.schema_version == 2 and event.shadow is None
        assert event.text == text
        assert event.label == prediction["label"]
        assert event.model_version == prediction["model_version"]
        assert event.scores == pytest.approx(prediction["scores"])
        assert event.confidence == pytest.approx(prediction["confidence"])
        assert event.client_id == "checkout-page"
        assert event.latency_ms > 0
    assert by_id[anonymous["prediction_id"]].client_id is None
