"""The whole loop on the real default base model: does feedback make the model better, and at what cost?

A champion is fine-tuned on part of the movie-review corpus; 300 corrections from another domain (product, app and
service reviews, hand-written in benchmarks/data) arrive as accepted feedback; one retrain runs through the gate.
Printed: champion vs challenger accuracy and macro-F1 on held-out new-domain reviews and on the golden holdout,
and the retrain wall time. The baseline is the champion, measured in the same run.

    python benchmarks/loop_bench.py --data ../shared/data/rotten_tomatoes.csv
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from feedback.store import FeedbackStore
from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.logs import configure_logging
from flywheel.models.retrain import RunTrigger
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.data import load_dataset
from retrain.evaluation import Metrics, evaluate
from retrain.pipeline import TrainingPipeline
from retrain.runner import RetrainRunner
from retrain.trainer import Trainer

PRODUCT_REVIEWS = Path(__file__).parent / "data" / "product_reviews.csv"


def scores(version: ModelVersion, frame: pd.DataFrame) -> Metrics:
    classifier = Classifier.load(version.model_dir, max_length=version.card.max_length, version=version.version)
    return evaluate(classifier, frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--champion-rows", type=int, default=4000, help="Movie reviews the champion is trained on.")
    parser.add_argument("--corrections", type=int, default=300, help="New-domain corrections sent as feedback.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    configure_logging("INFO")
    torch.set_num_threads(args.threads)

    movies = load_dataset(args.data).sample(n=args.champion_rows, random_state=0)
    products = pd.read_csv(PRODUCT_REVIEWS).sample(frac=1.0, random_state=0)
    corrections, new_domain_test = products.iloc[: args.corrections], products.iloc[args.corrections :]

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), epochs=args.epochs, torch_threads=args.threads, feedback_rate_limit=0)
        registry = ModelRegistry(settings)
        started = time.monotonic()
        TrainingPipeline(settings, registry, Trainer(settings)).run(movies)
        champion_seconds = time.monotonic() - started
        champion = registry.champion_version()

        database = Database.from_settings(settings).upgrade()
        store = FeedbackStore(database, settings)
        # One trusted annotator sends the corrections: nothing is trusted by default.
        store.set_source("annotator", trusted=True)
        store.import_labels(zip(corrections["text"], corrections["label"], strict=True), source="annotator")
        runner = RetrainRunner(settings, database, registry)
        started = time.monotonic()
        run = runner.run(RunTrigger.MANUAL)
        retrain_seconds = time.monotonic() - started
        assert run is not None
        challenger = registry.get(run.challenger_version) if run.challenger_version else champion

        holdout = TrainingPipeline(settings, registry).holdout.load()
        rows = []
        for name, version in (("champion", champion), ("challenger", challenger)):
            new = scores(version, new_domain_test[["text", "label"]])
            old = scores(version, holdout)
            rows.append((name, version.version, new, old))
        database.dispose()

    print(f"\nchampion: {args.champion_rows} movie reviews, {args.epochs} epochs, trained in {champion_seconds:.0f} s")
    print(f"feedback: {len(corrections)} new-domain corrections ({run.feedback_train_rows} trained on, "
          f"{run.feedback_eval_rows} held out for the gate); new-domain test set: {len(new_domain_test)} reviews")
    print(f"{'model':<11} {'version':<18} {'new-domain acc':>14} {'new-domain F1':>14} {'holdout acc':>12} "
          f"{'holdout F1':>11}")
    for name, version, new, old in rows:
        print(f"{name:<11} {version:<18} {new.accuracy:>14.4f} {new.macro_f1:>14.4f} {old.accuracy:>12.4f} "
              f"{old.macro_f1:>11.4f}")
    (_, _, new_c, old_c), (_, _, new_x, old_x) = rows
    gain, loss = new_x.macro_f1 - new_c.macro_f1, old_c.macro_f1 - old_x.macro_f1
    print(f"gate decision: {run.status} — {run.reason}")
    ratio = new_x.macro_f1 / new_c.macro_f1
    print(f"new-domain macro-F1 {gain * 100:+.1f} points (challenger/champion ratio {ratio:.3f}); "
          f"golden holdout {-loss * 100:+.1f} points; retrain wall time {retrain_seconds:.0f} s")
    met = gain >= 0.10 and loss <= 0.01 and retrain_seconds <= 600 and run.status == "promoted"
    print(f"target (+10 points new domain, <= 1 point holdout loss, retrain <= 10 min): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
