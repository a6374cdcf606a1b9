"""What the loop benchmarks share: labels sent over HTTP by keyed principals, vetting, one retrain, scoring.

The benchmarks run as scripts (`python benchmarks/x.py`), so this module is imported by its file name.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd

from flywheel.access import KeyStore
from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.models.access import Role
from flywheel.models.retrain import RetrainRunPublic, RunTrigger
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.evaluation import predictions
from retrain.runner import RetrainRunner

# The tests' helpers start `bentoml serve` and run CLI commands in-process; they live beside the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: One principal's labels: its name, its role, and the rows it sends.
Batch = tuple[str, Role, pd.DataFrame]


def classify(version: ModelVersion, texts: list[str]) -> list[str]:
    """The label a registered version gives each text."""
    classifier = Classifier.load(version.model_dir, max_length=version.card.max_length, version=version.version)
    return predictions(classifier, texts)


def post_labels(url: str, key: str, rows: pd.DataFrame) -> None:
    """Send each row as `POST /feedback` with the principal's key."""
    with httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": key}) as http:
        for text, label in zip(rows["text"], rows["label"], strict=True):
            answer = http.post("/feedback", json={"text": text, "label": label})
            if answer.status_code != 202:
                raise SystemExit(f"POST /feedback answered {answer.status_code}: {answer.text}")


@dataclass
class LoopResult:
    """One loop: every label with its status, the retrain run, its wall time, and the model served after it."""

    labels: pd.DataFrame
    run: RetrainRunPublic
    seconds: float
    model: ModelVersion
    #: Names of the sources vetting quarantined.
    quarantined: list[str]


def bench_env(home: Path, threads: int) -> dict[str, str]:
    """The environment of a loop's CLI commands and service: its home, no broker (the request log spills)."""
    return {
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_TORCH_THREADS": str(threads),
        "FLYWHEEL_KAFKA_BOOTSTRAP": "127.0.0.1:9",
    }


def log_traffic(database: Database, settings: Settings, texts: list[str]) -> None:
    """Store the champion's predictions on ``texts`` as `flywheel ingest` stores the traffic the service logged
    (the loop benchmarks run without a broker)."""
    from feedback.prediction_rows import prediction_row
    from feedback.store import FeedbackStore
    from flywheel.events import PredictionEvent, new_id, utcnow

    champion = ModelRegistry(settings).champion_version()
    classifier = Classifier.load(champion.model_dir, max_length=champion.card.max_length, version=champion.version)
    rows = []
    for text, probs in zip(texts, classifier.predict_proba(texts).probs, strict=True):
        scores = {label: round(float(p), 6) for label, p in zip(classifier.labels, probs, strict=True)}
        label = max(scores, key=lambda name: scores[name])
        event = PredictionEvent(prediction_id=new_id(), model_version=champion.version, text=text, label=label,
                                confidence=scores[label], scores=scores, latency_ms=0.0)
        rows.append(prediction_row(event, utcnow()))
    FeedbackStore(database, settings).ingest(rows)


def run_loop(
    home: Path,
    env: dict[str, str],
    batches: list[Batch],
    trusted: tuple[str, ...] = ("annotator",),
    traffic: list[str] | None = None,
) -> LoopResult:
    """Keys, labels over HTTP, trust for ``trusted``, vetting, one retrain; what was accepted and which model won.

    ``traffic``: texts the champion served without labels before the retrain (what self-training reads).
    """
    from tests.conftest import run_cli, running_service

    # The retrain runs in this process: it must read the loop's seed as the CLI commands and the service do.
    settings = Settings(home=home, **({"seed": int(env["FLYWHEEL_SEED"])} if "FLYWHEEL_SEED" in env else {}))
    database = Database.from_settings(settings).start()
    store = KeyStore(database)
    keys = {name: store.create(name, role, "bench")[1] for name, role, _ in batches}
    for name in trusted:
        answer = run_cli(env, "sources", "trust", name)
        if answer.returncode != 0:
            raise SystemExit(f"flywheel sources trust failed: {answer.stderr}")
    with running_service(env) as url:
        for name, _, rows in batches:
            post_labels(url, keys[name], rows)
    if traffic:
        log_traffic(database, settings, traffic)
    vetted = run_cli(env, "feedback", "vet")
    if vetted.returncode != 0:
        raise SystemExit(f"flywheel feedback vet failed: {vetted.stderr}")
    labels = pd.read_csv(io.StringIO(run_cli(env, "feedback", "export").stdout))
    sources = json.loads(run_cli(env, "sources", "list", "--json").stdout)
    started = time.monotonic()
    run = RetrainRunner(settings, database, ModelRegistry(settings)).run(RunTrigger.MANUAL)
    seconds = time.monotonic() - started
    database.dispose()
    if run is None:
        raise SystemExit("another worker held the retrain lock")
    quarantined = [source["source"] for source in sources if source["quarantined"]]
    return LoopResult(labels, run, seconds, ModelRegistry(settings).champion_version(), quarantined)
