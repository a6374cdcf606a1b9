"""What does the review queue's order buy over labelling at random?

A champion is fine-tuned with the default settings on movie reviews. The champion classifies a pool of 300
new-domain texts (the product reviews of benchmarks/data) and the predictions are stored as `flywheel ingest` stores
them. Then, for each labelling budget, a trusted annotator labels the first N texts of an order over HTTP and one
retrain runs with the default settings, from a copy of the same champion:
- the queue's order: `ReviewQueue.next` (drift targets first, then smallest margin, near-duplicates collapsed);
- random order, over several seeds (the baseline, measured in the same run).
Printed: new-domain macro-F1 on the 200 held-out texts after each budget, for the queue and for each random seed,
and the queue's lead over random's mean (target: at least +3 points at 100 labels).

    python benchmarks/active_bench.py --data ../shared/data/rotten_tomatoes.csv --random-seeds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from harness import bench_env, classify, run_loop

from feedback.prediction_rows import prediction_row
from feedback.review import ReviewQueue
from feedback.store import FeedbackStore
from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.events import PredictionEvent, new_id, utcnow
from flywheel.logs import configure_logging
from flywheel.models.access import Role
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.data import load_dataset
from retrain.evaluation import score
from retrain.pipeline import TrainingPipeline
from retrain.trainer import Trainer

PRODUCT_REVIEWS = Path(__file__).parent / "data" / "product_reviews.csv"
POOL_ROWS = 300


def store_predictions(settings: Settings, champion: ModelVersion, pool: pd.DataFrame) -> None:
    """The champion's predictions of the pool, stored as ingestion stores them from the request log."""
    classifier = Classifier.load(champion.model_dir, max_length=champion.card.max_length, version=champion.version)
    probs = classifier.predict_proba(pool["text"].tolist()).probs
    now = utcnow()
    rows = []
    for text, row in zip(pool["text"], probs, strict=True):
        scores = {label: float(p) for label, p in zip(classifier.labels, row, strict=True)}
        label = max(scores, key=lambda name: scores[name])
        event = PredictionEvent(prediction_id=new_id(), model_version=champion.version, text=text, label=label,
                                confidence=scores[label], scores=scores, latency_ms=1.0)
        rows.append(prediction_row(event, now))
    database = Database.from_settings(settings).start()
    FeedbackStore(database, settings).ingest(rows)
    database.dispose()


def queue_order(settings: Settings, pool: pd.DataFrame) -> pd.DataFrame:
    """The pool in the order the review queue offers it."""
    database = Database.from_settings(settings).start()
    items = ReviewQueue(database, settings).next(limit=len(pool))
    database.dispose()
    truth = dict(zip(pool["text"], pool["label"], strict=True))
    offered = [item.text for item in items]
    # Near-duplicates the queue collapsed come last, as a labeller would reach them only after the rest.
    rest = [text for text in pool["text"] if text not in set(offered)]
    return pd.DataFrame({"text": offered + rest, "label": [truth[text] for text in offered + rest]})


def after_labels(
    base: Path, scratch: Path, name: str, rows: pd.DataFrame, *, test: pd.DataFrame, threads: int
) -> float:
    """New-domain macro-F1 of the model served after ``rows`` are labelled and one retrain ran."""
    home = scratch / name
    shutil.copytree(base, home)
    result = run_loop(home, bench_env(home, threads), [("annotator", Role.ANNOTATOR, rows)])
    predicted = classify(result.model, test["text"].tolist())
    f1 = score(test["label"].tolist(), predicted, result.model.card.labels).macro_f1
    print(f"  {name}: {len(rows)} labels, {result.run.status}, new-domain macro-F1 {f1:.4f}, "
          f"retrain {result.seconds:.0f} s", flush=True)
    shutil.rmtree(home)
    return f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--champion-rows", type=int, default=2000)
    parser.add_argument("--budgets", default="50,100,200,300", help="Labels per run, comma-separated.")
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--pool-rows", type=int, default=POOL_ROWS, help="New-domain texts offered for labelling.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    configure_logging("WARNING")
    budgets = [int(b) for b in args.budgets.split(",")]

    movies = load_dataset(args.data).sample(n=args.champion_rows, random_state=0)
    products = pd.read_csv(PRODUCT_REVIEWS).sample(frac=1.0, random_state=0)[["text", "label"]]
    pool, test = products.iloc[: args.pool_rows], products.iloc[args.pool_rows :]
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        base = scratch / "champion"
        settings = Settings(home=base, torch_threads=args.threads)
        registry = ModelRegistry(settings)
        started = time.monotonic()
        TrainingPipeline(settings, registry, Trainer(settings, progress=False)).run(movies)
        Database.from_settings(settings).upgrade().dispose()
        champion = registry.champion_version()
        store_predictions(settings, champion, pool)
        ordered = queue_order(settings, pool)
        start_f1 = score(test["label"].tolist(), classify(champion, test["text"].tolist()), champion.card.labels)
        print(f"champion on {len(movies)} movie reviews ({time.monotonic() - started:.0f} s): new-domain macro-F1 "
              f"{start_f1.macro_f1:.4f} on {len(test)} held-out texts", flush=True)

        queue = {
            b: after_labels(
            base, scratch, f"queue-{b}", ordered.iloc[:b], test=test, threads=args.threads
        ) for b in budgets}
        random: dict[int, list[float]] = {b: [] for b in budgets}
        for seed in range(args.random_seeds):
            shuffled = pool.sample(frac=1.0, random_state=seed)
            for b in budgets:
                random[b].append(
                    after_labels(base, scratch, f"random{seed}-{b}", shuffled.iloc[:b], test=test, threads=args.threads)
                )

    print(f"\n{'labels':>6} {'queue':>7} {'random mean':>11} {'random min-max':>15} {'lead pts':>9}")
    for b in budgets:
        mean = float(np.mean(random[b]))
        print(f"{b:>6} {queue[b]:>7.4f} {mean:>11.4f} {min(random[b]):>7.4f}-{max(random[b]):.4f} "
              f"{(queue[b] - mean) * 100:>+9.2f}")
    if 100 in budgets:
        lead = queue[100] - float(np.mean(random[100]))
        print(f"queue's lead at 100 labels: {lead * 100:+.2f} points over random's mean of {args.random_seeds} seeds "
              f"(target >= +3) — {'met' if lead >= 0.03 else 'NOT MET'}")


if __name__ == "__main__":
    main()
