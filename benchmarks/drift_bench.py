"""Time a full drift report (10,000 reference, 5,000 current texts) that reads the window's stored embeddings.

The serving model is the real default base model (all-MiniLM-L6-v2) with a seeded two-label head, registered in
a temporary state directory with the reference rows as its training data; the drift encoder is the same base
model (``flywheel.encoder``). The windows are logged predictions in a SQLite store, embedded once by the ingestion
process's background embedder (``flywheel.embedding``; timed and printed separately, as ingestion pays it, not
the report). Cases, each a full report that reads its window from the store:

- ``unperturbed``: 5,000 texts sampled from the same file (the file has only 10,752 rows, so most of them are
  also in the 10,000-row reference);
- ``perturbed``: the same 5,000 texts moved to another domain (product reviews instead of film reviews);
- ``disjoint``: a second model version whose reference is every row not in the current sample (5,752 rows),
  against the unperturbed 5,000: a no-drift check with no shared texts.

Baseline, measured in the same run: today's path, the unperturbed report embedding its whole window itself and
running Evidently on every row with its t-SNE picture of 500 embeddings a side.

    python benchmarks/drift_bench.py --data ../shared/data/rotten_tomatoes.csv [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import torch
from sqlmodel import func, select

from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.embedding import PredictionEmbedder
from flywheel.events import PredictionEvent, new_id, utcnow
from flywheel.holdout import GoldenHoldout
from flywheel.logs import configure_logging
from flywheel.models.drift import PredictionEmbedding
from flywheel.registry import ModelCard, ModelRegistry, ModelVersion
from flywheel.settings import DEFAULT_BASE_MODEL, Settings
from monitoring.monitor import DriftMonitor, DriftOutcome
from monitoring.window import CurrentWindow, WindowReader
from retrain.trainer import resolve_base_model

LABELS = ["negative", "positive"]
DOMAIN_SWAP = {
    "film": "phone",
    "films": "phones",
    "movie": "laptop",
    "movies": "laptops",
    "director": "manufacturer",
    "actors": "batteries",
    "actor": "battery",
    "cast": "keyboard",
    "story": "screen",
    "plot": "charger",
    "script": "firmware",
    "characters": "features",
    "character": "feature",
    "performance": "battery life",
    "performances": "updates",
    "comedy": "headset",
    "drama": "tablet",
    "audience": "customers",
    "screen": "display",
}
PRODUCT_TAILS = [
    "Shipping took two weeks.",
    "The seller refunded me quickly.",
    "Battery died after two days.",
    "Arrived with a cracked display.",
    "Great value for the price.",
    "Customer support never answered.",
]
_WORD = re.compile(r"[A-Za-z]+")


def to_products(text: str, rng: random.Random) -> str:
    """A film review rewritten as a product review: swapped nouns plus a shipping or support remark."""
    swapped = _WORD.sub(lambda m: DOMAIN_SWAP.get(m.group(0).lower(), m.group(0)), text)
    return f"{swapped} {rng.choice(PRODUCT_TAILS)}"


def register(registry: ModelRegistry, model_dir: str, training: pd.DataFrame, seed: int) -> ModelVersion:
    """Register the base model with a seeded, untrained two-label head and ``training`` as its training data."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={v: i for i, v in enumerate(LABELS)}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    card = ModelCard(
        labels=LABELS,
        base_model=model_dir,
        max_length=128,
        data_sha256="benchmark",
        holdout_sha256="benchmark",
        train_rows=len(training),
        validation_rows=0,
        holdout_metrics={},
        validation_metrics={},
        quality_report={},
        hyperparameters={},
        training_seconds=0.0,
        epochs_run=0,
        stopped_because="benchmark: untrained classification head",
    )

    def write(path: Path) -> None:
        model.save_pretrained(path / "model")
        tokenizer.save_pretrained(path / "model")
        training[["text", "label"]].to_parquet(path / "training_data.parquet", index=False)

    return registry.save(card, write)


def log_predictions(
    store: FeedbackStore, classifier: Classifier, texts: list[str], version: str, at: datetime
) -> None:
    """Store the model's predictions of ``texts`` as ingestion would, logged in the minute before ``at``."""
    probs = classifier.predict_proba(texts).probs
    rows = []
    for i, (text, p) in enumerate(zip(texts, probs, strict=True)):
        scores = {label: float(p[j]) for j, label in enumerate(LABELS)}
        event = PredictionEvent(
            prediction_id=new_id(),
            model_version=version,
            text=text,
            label=LABELS[int(p.argmax())],
            confidence=float(p.max()),
            scores=scores,
            latency_ms=1.0,
            emitted_at=at - timedelta(seconds=60 * (len(texts) - i) / len(texts)),
        )
        rows.append(prediction_row(event, utcnow()))
    for start in range(0, len(rows), 1000):
        store.ingest(rows[start : start + 1000])


def embed_stored(settings: Settings, database: Database, rows: int) -> float:
    """Seconds the ingestion process's background embedder takes to embed ``rows`` stored predictions."""
    stop = threading.Event()
    started = time.perf_counter()
    embedder = PredictionEmbedder(settings, database, stop).start()
    try:
        while True:
            with database.read_session() as session:
                done = int(session.exec(select(func.count()).select_from(PredictionEmbedding)).one())
            if done >= rows:
                return time.perf_counter() - started
            time.sleep(0.2)
    finally:
        stop.set()
        embedder.supervisor.join(60)


def report_line(case: str, outcome: DriftOutcome, wall: float, cpu: float) -> str:
    """One printed line per report (CPU time counts every thread of this process)."""
    s = outcome.summary
    t = s.timings
    return (
        f"{case:<26} {s.reference_rows:>6} {s.current_rows:>6}  wall {wall:6.1f}s  cpu {cpu:6.1f}s"
        f"  reference {t['reference_seconds']:5.1f}s  embedding {t['embedding_seconds']:5.1f}s"
        f" ({s.embeddings_stored} stored, {s.embeddings_computed} embedded)"
        f"  evidently {t['evidently_seconds']:5.1f}s  targeting {t['targeting_seconds']:4.1f}s"
        f"  verdict {s.verdict:<9} fired: {', '.join(s.fired) or '-'}"
    )


def timed(case: str, report: Callable[[], DriftOutcome]) -> tuple[DriftOutcome, float]:
    """Run one report, print its line; returns it and its wall seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    outcome = report()
    wall = time.perf_counter() - started
    print(report_line(case, outcome, wall, time.process_time() - cpu), flush=True)
    return outcome, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--reference", type=int, default=10_000, help="Reference rows.")
    parser.add_argument("--current", type=int, default=5_000, help="Current rows.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1,000 reference and 500 current rows.")
    parser.add_argument("--no-disjoint", action="store_true", help="Skip the disjoint no-drift case.")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 2))
    parser.add_argument("--model", default=DEFAULT_BASE_MODEL, help="Base model directory (default: bundled).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=10.0, help="Seconds a report may take.")
    args = parser.parse_args()
    if args.quick:
        args.reference, args.current = 1_000, 500
    configure_logging("WARNING")
    torch.set_num_threads(args.threads)

    data = pd.read_csv(args.data).dropna(subset=["text", "label"]).astype({"text": str, "label": str})
    data = data.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    n_ref = min(args.reference, len(data))
    reference = data.iloc[:n_ref]
    current = data.sample(min(args.current, len(data)), random_state=args.seed + 1)
    rng = random.Random(args.seed)
    perturbed = [to_products(t, rng) for t in current["text"]]
    overlap = len(set(current["text"]) & set(reference["text"]))
    print(
        f"data {args.data}: {len(data)} rows; reference {len(reference)}, current {len(current)} "
        f"({overlap} of them also in the reference); torch threads {args.threads}; "
        f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(
            home=Path(home), torch_threads=args.threads, seed=args.seed, base_model=args.model
        )
        database = Database.from_settings(settings).upgrade()
        registry = ModelRegistry(settings)
        model_dir = resolve_base_model(args.model)
        entry = register(registry, model_dir, reference, args.seed)
        registry.promote(entry.version, reason="benchmark")
        GoldenHoldout(settings.home / "holdout").freeze(reference.head(500))
        monitor = DriftMonitor(settings, registry, database)
        classifier = monitor.classifier(entry)
        started = time.perf_counter()
        monitor.prepare(entry)
        print(
            f"reference of the version built once: {time.perf_counter() - started:.1f}s "
            f"(its predictions, and {n_ref} texts embedded by drift encoder {monitor.encoder().encoder_id})"
        )

        # The two windows lie in consecutive hours, so one store holds both.
        now = utcnow()
        ends = {"unperturbed": now - timedelta(hours=1), "perturbed": now}
        store = FeedbackStore(database, settings)
        log_predictions(store, classifier, current["text"].tolist(), entry.version, ends["unperturbed"])
        log_predictions(store, classifier, perturbed, entry.version, ends["perturbed"])
        rows = 2 * len(current)
        seconds = embed_stored(settings, database, rows)
        print(
            f"ingestion's background embedder: {rows} predictions embedded and stored in {seconds:.1f}s "
            f"({rows / seconds:.0f} texts/s; {2 * monitor.encoder().dims} bytes each, float16)"
        )
        reader = WindowReader(database)
        encoder_id = monitor.encoder().encoder_id

        def stored_window(case: str, encoder: str | None = encoder_id) -> CurrentWindow:
            return reader.load(1.0, args.current, now=ends[case], encoder_id=encoder)

        # Today's path: every row of both sides, Evidently's t-SNE picture of 500 a side, the window embedded by the
        # report; it shares this home, so the reference it reads is the one built above.
        today = settings.model_copy(
            update={"drift_sample_rows": 10**9, "drift_embedding_projection": "tsne", "drift_embedding_plot_rows": 500}
        )
        old_path = DriftMonitor(today, registry, database)
        old_path.prepare(entry)
        print(f"{'case':<26} {'ref':>6} {'cur':>6}")
        baseline, baseline_wall = timed(
            "baseline: today's path", lambda: old_path.evaluate(stored_window("unperturbed", None), entry)
        )
        walls: dict[str, float] = {}
        outcomes: dict[str, DriftOutcome] = {}
        for case in ends:
            outcomes[case], walls[case] = timed(
                f"{case} (stored)", lambda case=case: monitor.evaluate(stored_window(case), entry)
            )

        if not args.no_disjoint:
            rest = data.drop(index=current.index).head(args.reference)
            second = register(registry, model_dir, rest, args.seed)
            # Build (and cache) the second version's reference and calibration outside the timed report.
            monitor.prepare(second)

            def disjoint() -> DriftOutcome:
                window = stored_window("unperturbed")
                window.frame = window.frame.assign(model_version=second.version)
                return monitor.evaluate(window, second)

            outcomes["disjoint"], walls["disjoint"] = timed("disjoint (stored)", disjoint)
        database.dispose()

    expected = {"unperturbed": "no_drift", "perturbed": "drifted", "disjoint": "no_drift"}
    correct = all(outcomes[c].summary.verdict == expected[c] for c in outcomes)
    slowest = max(walls.values())
    met = slowest <= args.target and correct
    print(
        f"\nreport reading stored embeddings: {walls['unperturbed']:.1f}s unperturbed, {walls['perturbed']:.1f}s "
        f"perturbed; baseline (today's path) {baseline_wall:.1f}s "
        f"({baseline.summary.timings['embedding_seconds']:.1f}s of it embedding) -> "
        f"{baseline_wall / max(walls['unperturbed'], 1e-9):.2f}x faster"
    )
    print(
        f"verdicts {'correct' if correct else 'WRONG'}: "
        + ", ".join(f"{c}={o.summary.verdict}" for c, o in outcomes.items())
        + f"; load average at end {os.getloadavg()[0]:.2f}"
    )
    print(f"<= {args.target:g} s per report: {'met' if met else 'NOT MET'} (slowest {slowest:.1f}s)")


if __name__ == "__main__":
    main()
