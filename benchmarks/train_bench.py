"""Fine-tune the real default base model on a labeled corpus and report throughput, wall time and macro-F1.

Baselines measured in the same run: TF-IDF + logistic regression on the same split (quality) and the base
model's forward-only inference throughput (speed).

    python benchmarks/train_bench.py --data ../shared/data/rotten_tomatoes.csv
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from flywheel.classifier import Classifier
from flywheel.logs import configure_logging
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.data import load_dataset
from retrain.evaluation import score
from retrain.pipeline import TrainingPipeline
from retrain.trainer import Trainer, resolve_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N rows (smoke runs).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    configure_logging("INFO")
    torch.set_num_threads(args.threads)

    raw = load_dataset(args.data)
    if args.limit:
        raw = raw.sample(n=min(args.limit, len(raw)), random_state=0)
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), torch_threads=args.threads)
        pipeline = TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings))
        started = time.monotonic()
        outcome = pipeline.run(raw)
        wall = time.monotonic() - started

        train = pd.read_parquet(outcome.version.training_data_path)
        holdout = pipeline.holdout.load()
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        baseline = LogisticRegression(max_iter=2000, C=4.0).fit(vectorizer.fit_transform(train["text"]), train["label"])
        predicted = baseline.predict(vectorizer.transform(holdout["text"])).tolist()
        baseline_f1 = score(holdout["label"].tolist(), predicted, outcome.holdout.labels).macro_f1

        base = Classifier.load(resolve_base_model(settings.base_model), settings.max_length)
        sample = train["text"].head(1024).tolist()
        base.predict_proba(sample[:64])
        t0 = time.monotonic()
        base.predict_proba(sample, batch_size=64)
        inference_rate = len(sample) / (time.monotonic() - t0)

    t = outcome.training
    f1 = outcome.holdout_metrics.macro_f1
    print(outcome.quality.render())
    print(outcome.holdout_metrics.render("fine-tuned on golden holdout"))
    print(f"rows: train {outcome.version.card.train_rows}, validation {outcome.version.card.validation_rows}, "
          f"holdout {outcome.holdout.rows}; threads {args.threads}; device {Trainer(settings).device}")
    print(f"training: {t.epochs_run} epochs ({t.stopped_because}), {t.seconds:.1f} s in the trainer, "
          f"{t.samples_per_second:.1f} samples/s")
    print(f"wall time (clean + split + train + evaluate + register): {wall:.1f} s = {wall / 60:.2f} min")
    print(f"macro-F1 fine-tuned {f1:.4f} vs TF-IDF+LR baseline {baseline_f1:.4f}: ratio {f1 / baseline_f1:.3f}")
    print(f"training throughput {t.samples_per_second:.1f} samples/s vs forward-only inference "
          f"{inference_rate:.1f} texts/s: ratio {t.samples_per_second / inference_rate:.3f}")
    target = f1 >= 0.82 and wall <= 20 * 60
    print(f"target (macro-F1 >= 0.82 within 20 min): {'met' if target else 'NOT met'}")


if __name__ == "__main__":
    main()
