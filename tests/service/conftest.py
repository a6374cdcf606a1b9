"""Fixtures of the service tests: the app in-process, one shared `bentoml serve` for the end-to-end checks, and
metric parsing."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from flywheel.broker import EmbeddedBroker
from tests.conftest import app_client, copy_home, running_service

#: Fast hot reload and reconnection so the tests do not wait on production intervals.
FAST_ENV = {"FLYWHEEL_RELOAD_INTERVAL": "0.5", "FLYWHEEL_KAFKA_TIMEOUT": "3", "FLYWHEEL_KAFKA_RETRY_INTERVAL": "0.5"}


@pytest.fixture(scope="session")
def service_env(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """A private copy of the trained home, wired to the session broker."""
    env = copy_home(trained_home, tmp_path_factory.mktemp("service") / "home")
    return {**env, **FAST_ENV, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}


@pytest.fixture(scope="session")
def service_url(service_env: dict[str, str]) -> Iterator[str]:
    """Base URL of a running `bentoml serve` shared by the end-to-end tests (BentoML's routes, real sockets)."""
    with running_service(service_env) as url:
        yield url


@pytest.fixture(scope="session")
def app(service_env: dict[str, str]) -> Iterator[TestClient]:
    """The service's HTTP API in this process, shared by the read-only tests."""
    with app_client(service_env) as client:
        yield client


@pytest.fixture()
def client(app: TestClient) -> TestClient:
    """An HTTP client for the shared in-process app."""
    return app


def samples(url: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels`` on the service's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the matching samples (0 when there are none)."""
    return sum(samples(url, name, **labels))
