"""Predictions over HTTP in-process: the contract, batching across concurrent requests, model info."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import httpx
import pytest
from fastapi.testclient import TestClient

from flywheel.registry import ModelRegistry
from tests.conftest import app_client, local_metric, settings_from

pytestmark = pytest.mark.slow


def test_single_text_gets_one_prediction_from_the_champion(client: TestClient) -> None:
    served = client.get("/model").json()
    response = client.post("/predict", json={"text": "the acting was really excellent"})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == served["version"]
    [prediction] = body["predictions"]
    assert set(prediction) == {"prediction_id", "label", "confidence", "scores", "model_version", "truncated"}
    assert prediction["label"] == "positive"
    assert prediction["model_version"] == served["version"]
    assert set(prediction["scores"]) == set(served["labels"]) == {"negative", "positive"}
    assert prediction["confidence"] == max(prediction["scores"].values())
    assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert uuid.UUID(prediction["prediction_id"]).version == 7
    assert prediction["truncated"] is False


def test_batch_answers_each_text_in_order(client: TestClient) -> None:
    texts = ["a great film", "an awful plot", "the cast was wonderful", "boring and dreadful story", "superb"]
    response = client.post("/predict", json={"texts": texts})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == ["positive", "negative", "positive", "negative", "positive"]
    ids = [p["prediction_id"] for p in predictions]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "ids are time-ordered"
    assert len({p["model_version"] for p in predictions}) == 1


def test_text_longer_than_the_model_reads_is_truncated_and_says_so(client: TestClient) -> None:
    long_text = "the movie was great and the plot was lovely " * 40
    response = client.post("/predict", json={"texts": [long_text, "short and good"]})
    assert response.status_code == 200
    assert [p["truncated"] for p in response.json()["predictions"]] == [True, False]


def test_text_over_the_character_budget_is_cut_before_tokenizing_and_says_so(client: TestClient) -> None:
    # The model reads 32 tokens, so texts are cut to 320 characters first. A 20,000-character word is one [UNK]
    # token to the tokenizer, which alone would not call it truncated; a word of 320 characters is not cut.
    word = "a" * 20_000
    response = client.post("/predict", json={"texts": [word, "x" * 320]})
    assert response.status_code == 200
    assert [p["truncated"] for p in response.json()["predictions"]] == [True, False]
    cut = client.post("/predict", json={"text": word[:320]}).json()["predictions"][0]
    # Alone or padded beside a longer text, the sums differ in the last digits only.
    expected = response.json()["predictions"][0]["scores"]
    assert cut["scores"] == pytest.approx(expected, abs=1e-4), "the model read the first 320 characters"


def test_model_reports_version_labels_metrics_and_load_time(client: TestClient, service_env: dict[str, str]) -> None:
    info = client.get("/model").json()
    assert info["labels"] == ["negative", "positive"]
    assert 0.0 <= info["holdout_metrics"]["macro_f1"] <= 1.0
    assert datetime.fromisoformat(info["loaded_at"]) >= datetime.fromisoformat(info["created_at"])
    assert info["device"] == "cpu" and info["max_length"] == 32
    # The worker serves in the runtime the model card chose when the version was registered.
    assert info["runtime"] == ModelRegistry(settings_from(service_env)).get(info["version"]).card.runtime
    assert info["dtype"] == ("int8" if info["runtime"] == "onnx-int8" else "float32")


def test_concurrent_requests_are_batched_together(service_env: dict[str, str]) -> None:
    # A bound of its own: on a loaded machine the measured throughput may size the worker's bound below the burst,
    # and refusals are what tests/service/test_admission*.py check; this test is about batching.
    with app_client({**service_env, "FLYWHEEL_ADMISSION_MAX_TEXTS": "256"}) as client:
        _burst_is_batched(client)


def _burst_is_batched(client: TestClient) -> None:
    batches_before = local_metric("flywheel_batch_requests_count")
    requests_before = local_metric("flywheel_batch_requests_sum")

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as http:
            return await asyncio.gather(
                *(http.post("/predict", json={"text": f"a really great movie {i}"}) for i in range(96))
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    requests = local_metric("flywheel_batch_requests_sum") - requests_before
    batches = local_metric("flywheel_batch_requests_count") - batches_before
    assert requests == 96
    assert batches < requests / 2, f"{requests:.0f} concurrent requests ran in {batches:.0f} batches"
