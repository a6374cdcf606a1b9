"""A text that breaks the model fails its own request only: the requests it shared a forward pass with succeed.

Every text the tokenizer rejects (lone surrogates) is refused before batching now, and no valid text found fails
inside the tiny model, so the poison is real in another way: a copy of the champion keeps only 16 of its position
embeddings while its card still says it reads 32 tokens, and a text of more than 16 tokens fails inside its forward
pass, as it would on any model whose card promises more positions than its weights have.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from flywheel.broker import EmbeddedBroker
from flywheel.registry import TRAINING_DATA_FILE, ModelRegistry
from flywheel.settings import Settings
from tests.conftest import app_client, copy_home
from tests.service.conftest import FAST_ENV

pytestmark = pytest.mark.slow

#: Over 16 tokens, under the 32 the card says the model reads and under the character budget: valid, and poison.
POISON = "the movie was really quite good and the plot was very lovely and the acting was great too"
POSITIONS = 16
REQUESTS = 64
POISON_AT = 40


def _promote_with_positions(env: dict[str, str], positions: int) -> str:
    """Register a copy of the champion cut to ``positions`` position embeddings and promote it; its version."""
    registry = ModelRegistry(Settings(home=Path(env["FLYWHEEL_HOME"])))
    champion = registry.champion_version()

    def write(path: Path) -> None:
        model = path / "model"
        shutil.copytree(champion.model_dir, model, dirs_exist_ok=True)
        shutil.copy(champion.training_data_path, path / TRAINING_DATA_FILE)
        for weights in model.glob("*.safetensors"):
            tensors = load_file(weights)
            cut = {k: v[:positions].clone() for k, v in tensors.items() if k.endswith("position_embeddings.weight")}
            if cut:
                save_file({**tensors, **cut}, weights, metadata={"format": "pt"})
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))

    card = champion.card.model_copy(update={"parent_version": champion.version})
    version = registry.save(card, write).version
    registry.promote(version, reason="test: fewer positions than the card's max_length")
    return version


@pytest.fixture()
def served(trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    """The app serving a champion with ``POSITIONS`` position embeddings; yields a client and its version."""
    env = {
        **copy_home(trained_home, tmp_path / "home"),
        **FAST_ENV,
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        # Concurrent requests gather into few batches, so the poison shares its forward pass with others.
        "FLYWHEEL_BATCH_MAX_WAIT_MS": "200",
    }
    version = _promote_with_positions(env, POSITIONS)
    with app_client(env) as client:
        assert client.get("/model").json()["version"] == version
        yield client, version


def _burst(client: TestClient, texts: list[str]) -> list[httpx.Response]:
    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as http:
            return await asyncio.gather(*(http.post("/predict", json={"text": text}) for text in texts))

    return asyncio.run(send())


def test_a_poison_text_in_a_batch_of_64_concurrent_requests_fails_alone(
    served: tuple[TestClient, str], caplog: pytest.LogCaptureFixture
) -> None:
    client, version = served
    texts = [f"a really great movie {i}" for i in range(REQUESTS)]
    texts[POISON_AT] = POISON
    with caplog.at_level(logging.WARNING, logger="service.batcher"):
        responses = _burst(client, texts)

    poisoned = responses.pop(POISON_AT)
    assert poisoned.status_code == 422, poisoned.text
    assert f"model {version} cannot classify this text" in poisoned.json()["detail"]
    assert [r.status_code for r in responses] == [200] * (REQUESTS - 1)
    assert all(r.json()["predictions"][0]["label"] in {"negative", "positive"} for r in responses)
    # The poison really shared its forward pass: a batch of several requests failed, and was run request by request.
    failed = [r.getMessage() for r in caplog.records if "running each request alone" in r.getMessage()]
    requests = [int(found[1]) for message in failed if (found := re.search(r" in (\d+) requests", message))]
    assert requests and max(requests) > 1, failed

    # Alone, it fails the same way; several texts in one request fail together; the service keeps answering.
    alone = client.post("/predict", json={"text": POISON})
    assert alone.status_code == 422 and "though it classifies other texts" in alone.json()["detail"]
    several = client.post("/predict", json={"texts": ["a great film", POISON]})
    assert several.status_code == 422 and "one or more of these 2 texts" in several.json()["detail"]
    assert client.post("/predict", json={"text": "a great film"}).status_code == 200
