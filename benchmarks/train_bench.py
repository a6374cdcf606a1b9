"""Does `flywheel train` with its defaults beat the plain baselines at every data size?

For each size and seed, the same rows (a seeded sample of the corpus) train three models, all scored on one fixed
test set of 1,000 rows that no run trains on:
- Flywheel's default training (`TrainingPipeline` with default settings, real all-MiniLM-L6-v2): it holds out its own
  golden holdout and validation rows from those rows, as `flywheel train --data` does;
- frozen encoder + logistic regression: the sentence-transformers embeddings of the same base model (as
  `SentenceTransformer.encode` gives them) and scikit-learn's `LogisticRegressionCV` over C, on all the rows;
- TF-IDF (word 1-2 grams, sublinear tf) + `LogisticRegressionCV`, on all the rows.
Printed: macro-F1 of each, Flywheel's difference to the best baseline with a paired-bootstrap 95% interval, the
wall time of Flywheel's run; then the mean over seeds per size against the targets (200 rows: no worse than the
best baseline; 800 rows and more: at least the best baseline + 2 points; the 9,000-row run within 20 minutes).

    python benchmarks/train_bench.py --data ../shared/data/rotten_tomatoes.csv --rows 200,800,2000,9000 --seeds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegressionCV

from flywheel.logs import configure_logging
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.data import load_dataset
from retrain.evaluation import bootstrap_macro_f1, predictions, score
from retrain.pipeline import TrainingPipeline
from retrain.trainer import Trainer, resolve_base_model

TEST_ROWS = 1000
C_GRID = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]


@dataclass
class Row:
    rows: int
    seed: int
    flywheel: float
    frozen: float
    tfidf: float
    diff_low: float
    diff_high: float
    seconds: float
    steps: int
    stopped: str

    @property
    def best_baseline(self) -> float:
        return max(self.frozen, self.tfidf)


def frozen_encoder(train: pd.DataFrame, test: pd.DataFrame, base: str, seed: int) -> list[str]:
    """What a user would write first: the model's sentence embeddings and a cross-validated logistic regression."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(base, device="cpu")
    x_train = encoder.encode(train["text"].tolist(), batch_size=64)
    x_test = encoder.encode(test["text"].tolist(), batch_size=64)
    model = LogisticRegressionCV(Cs=C_GRID, cv=5, max_iter=3000, random_state=seed).fit(x_train, train["label"])
    return [str(label) for label in model.predict(x_test)]


def tfidf(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> list[str]:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    model = LogisticRegressionCV(Cs=C_GRID, cv=5, max_iter=3000, random_state=seed)
    model.fit(vectorizer.fit_transform(train["text"]), train["label"])
    return [str(label) for label in model.predict(vectorizer.transform(test["text"]))]


def run_one(rows: pd.DataFrame, test: pd.DataFrame, seed: int, threads: int) -> Row:
    labels = sorted(test["label"].unique())
    truth = test["label"].tolist()
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), torch_threads=threads, seed=seed)
        started = time.monotonic()
        outcome = TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False)).run(rows)
        seconds = time.monotonic() - started
        ours = predictions(outcome.training.classifier(settings.max_length), test["text"].tolist())
    frozen = frozen_encoder(rows, test, resolve_base_model(settings.base_model), seed)
    words = tfidf(rows, test, seed)
    f1 = {name: score(truth, predicted, labels).macro_f1 for name, predicted in
          (("flywheel", ours), ("frozen", frozen), ("tfidf", words))}
    best = frozen if f1["frozen"] >= f1["tfidf"] else words
    low, high = bootstrap_macro_f1(truth, ours, labels, baseline=best, seed=seed)
    t = outcome.training
    return Row(len(rows), seed, f1["flywheel"], f1["frozen"], f1["tfidf"], low, high, seconds, t.steps_run,
               t.stopped_because)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--rows", default="200,800,2000,9000", help="Training-set sizes, comma-separated.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per size (each draws its own rows).")
    parser.add_argument("--test-rows", type=int, default=TEST_ROWS, help="Movie reviews never trained on, scored.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    configure_logging("WARNING")
    torch.set_num_threads(args.threads)

    corpus = load_dataset(args.data).sample(frac=1.0, random_state=1234).reset_index(drop=True)
    test = corpus.iloc[: args.test_rows].reset_index(drop=True)
    pool = corpus.iloc[args.test_rows :].reset_index(drop=True)
    sizes = [int(size) for size in args.rows.split(",")]
    if max(sizes) > len(pool):
        raise SystemExit(f"--rows asks for {max(sizes)} rows; the corpus has {len(pool)} beside the test set")

    print(f"test set: {len(test)} rows never trained on; threads {args.threads}")
    header = (f"{'rows':>5} {'seed':>4} {'flywheel':>8} {'frozen+LR':>9} {'tfidf+LR':>8} "
              f"{'vs best (95% CI)':>26} {'steps':>5} {'stopped':>14} {'wall s':>7}")
    print(header, flush=True)
    results: list[Row] = []
    for size in sizes:
        for seed in range(args.seeds):
            rows = pool.sample(n=size, random_state=seed).reset_index(drop=True)
            row = run_one(rows, test, seed, args.threads)
            results.append(row)
            diff = (row.flywheel - row.best_baseline) * 100
            print(f"{row.rows:>5} {row.seed:>4} {row.flywheel:>8.4f} {row.frozen:>9.4f} {row.tfidf:>8.4f} "
                  f"{diff:>+8.2f} [{row.diff_low * 100:+.2f}, {row.diff_high * 100:+.2f}] pts "
                  f"{row.steps:>5} {row.stopped:>14} {row.seconds:>7.0f}", flush=True)

    print("\nmean over seeds")
    print(f"{'rows':>5} {'flywheel':>8} {'best baseline':>13} {'diff':>8} {'ratio':>6} {'target':>22} {'verdict':>8}")
    for size in sizes:
        group = [row for row in results if row.rows == size]
        ours = float(np.mean([row.flywheel for row in group]))
        best = float(np.mean([row.best_baseline for row in group]))
        need, target = (0.0, "no worse than best") if size < 800 else (0.02, ">= best + 2 points")
        met = ours >= best + need - 1e-9
        print(f"{size:>5} {ours:>8.4f} {best:>13.4f} {(ours - best) * 100:>+7.2f} {ours / best:>6.3f} {target:>22} "
              f"{'met' if met else 'NOT MET':>8}")
    largest = [row for row in results if row.rows == max(sizes)]
    slowest = max(row.seconds for row in largest)
    if max(sizes) >= 9000:
        print(f"{max(sizes)}-row run: slowest {slowest / 60:.1f} min (target <= 20 min) — "
              f"{'met' if slowest <= 20 * 60 else 'NOT MET'}")


if __name__ == "__main__":
    main()
