"""Does training-set augmentation help? Macro-F1 with and without each augmentation, on small sets and a new domain.

Movie reviews (../shared/data/rotten_tomatoes.csv, shuffled once): 1,000 rows are frozen as the golden holdout of
every run's home (so `flywheel train` scores on them and never trains on them), 2,000 form the pool the training
sets are drawn from, and all the others train the label checker below. For each size (default 100, 300 and 1,000)
and seed, one seeded sample of the pool trains one model per augmentation (`none` first) with the default settings
and the real all-MiniLM-L6-v2, through `TrainingPipeline` as `flywheel train --augment ...` runs it. Augmentations:
each of synonym, insert, swap, delete alone, `eda` (all four), and back_translation when `--back-translation` names
two models.

The new domain (with `--new-domain`): a champion is trained on 1,000 movie reviews, then the 300 hand-written
product-review corrections of benchmarks/data are learned as a retrain's `warm` candidate learns them (replayed
movie rows plus the corrections at the retrain's feedback weight, the champion's validation rows and a share of
the corrections as checkpoint groups, warm start), with each augmentation applied to the correction rows only
(FLYWHEEL_AUGMENT_FEEDBACK_ONLY); scored on the other 200 product reviews and on the golden holdout.

Printed: macro-F1 per size and augmentation (mean over seeds), the difference to `none` with a paired-bootstrap 95%
interval (pooled over seeds), and how often a strong label checker agrees with the augmented rows' labels: frozen
all-MiniLM-L6-v2 sentence embeddings + logistic regression trained on the movie reviews no run uses, on a sample of
each augmentation's new rows, beside its agreement on the rows they came from (augmentation that keeps labels
scores about the same on both). An augmentation should be on by default only where it wins: its interval above 0.

    python benchmarks/augment_bench.py --sizes 100,300,1000 --seeds 3 --new-domain
    python benchmarks/augment_bench.py --quick     # sizes 100,300, one seed, none/synonym/eda
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression

from flywheel.holdout import GoldenHoldout
from flywheel.logs import configure_logging
from flywheel.registry import ModelRegistry
from flywheel.settings import DEFAULT_BASE_MODEL, Settings
from retrain.data import load_dataset
from retrain.evaluation import bootstrap_macro_f1, predictions, score
from retrain.pipeline import AUGMENTED_DATA_FILE, TrainingOutcome, TrainingPipeline, validation_data
from retrain.trainer import Trainer, resolve_base_model

DATA = Path(__file__).parent / "data"
HOLDOUT_ROWS = 1000
POOL_ROWS = 2000
CORRECTIONS = 300
AUGMENTATIONS = {
    "none": [],
    "synonym": ["synonym"],
    "insert": ["insert"],
    "swap": ["swap"],
    "delete": ["delete"],
    "eda": ["synonym", "insert", "swap", "delete"],
    "back_translation": ["back_translation"],
}


@dataclass
class Result:
    """One trained model: where it was trained, its predictions on each test set, its augmented rows."""

    setting: str
    seed: int
    augmentation: str
    predicted: dict[str, list[str]]
    truth: dict[str, list[str]]
    added: pd.DataFrame
    seconds: float
    steps: int


@dataclass
class Checker:
    """The strong label checker: frozen sentence embeddings and a logistic regression."""

    encoder: object
    model: LogisticRegression = field(default_factory=lambda: LogisticRegression(C=1.0, max_iter=3000))

    def fit(self, frame: pd.DataFrame) -> Checker:
        self.model.fit(self.embed(frame["text"].tolist()), frame["label"])
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(texts, batch_size=64))  # type: ignore[attr-defined]

    def agreement(self, texts: list[str], labels: list[str]) -> float:
        if not texts:
            return float("nan")
        return float(np.mean(self.model.predict(self.embed(texts)) == np.asarray(labels)))


def settings_for(home: Path, seed: int, threads: int, operations: list[str], models: list[str]) -> Settings:
    return Settings(
        home=home,
        seed=seed,
        torch_threads=threads,
        runtime="torch",
        augment=operations,
        back_translation_models=models if "back_translation" in operations else [],
    )


def train_one(home: Path, rows: pd.DataFrame, holdout: pd.DataFrame, settings: Settings, **run: Any) -> TrainingOutcome:
    """``flywheel train`` in ``home``, whose golden holdout is the benchmark's."""
    if not GoldenHoldout(home / "holdout").exists():
        GoldenHoldout(home / "holdout").freeze(holdout)
    pipeline = TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False))
    return pipeline.run(rows, **run)


def small_sets(args: argparse.Namespace, pool: pd.DataFrame, holdout: pd.DataFrame, scratch: Path) -> list[Result]:
    results = []
    for size in args.sizes:
        for seed in range(args.seeds):
            rows = pool.sample(n=size, random_state=seed).reset_index(drop=True)
            for name in args.augmentations:
                home = scratch / f"small-{size}-{seed}-{name}"
                settings = settings_for(home, seed, args.threads, AUGMENTATIONS[name], args.back_translation)
                started = time.monotonic()
                outcome = train_one(home, rows, holdout, settings)
                result = _result(f"{size} rows", seed, name, outcome, sets={"holdout": holdout}, started=started)
                results.append(result)
                print(f"  {size:>5} rows seed {seed} {name:<16} holdout "
                      f"{_f1(holdout, result.predicted['holdout']):.4f} (+{len(result.added)} rows, "
                      f"{result.steps} steps, {result.seconds:.0f} s)", flush=True)
    return results


def new_domain(args: argparse.Namespace, pool: pd.DataFrame, holdout: pd.DataFrame, scratch: Path) -> list[Result]:
    products = pd.read_csv(DATA / "product_reviews.csv")[["text", "label"]]
    results = []
    for seed in range(args.seeds):
        home = scratch / f"champion-{seed}"
        settings = settings_for(home, seed, args.threads, [], [])
        champion = train_one(home, pool.sample(n=1000, random_state=seed), holdout, settings).version
        shuffled = products.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        corrections, test = shuffled.iloc[:CORRECTIONS], shuffled.iloc[CORRECTIONS:].reset_index(drop=True)
        held = corrections.sample(frac=settings.validation_fraction, random_state=seed)
        learned = corrections.drop(index=held.index)
        replay = pd.read_parquet(champion.training_data_path)
        train = pd.concat(
            [
                replay.assign(weight=1.0, group="original", augment=False),
                learned.assign(weight=settings.retrain_feedback_weight, group="feedback", augment=True),
            ],
            ignore_index=True,
        )
        previous = validation_data(champion)
        assert previous is not None
        validation = pd.concat([previous.assign(group="original"), held.assign(group="feedback")], ignore_index=True)
        print(f"  new domain seed {seed}: champion on 1000 movie reviews, {len(learned)} corrections to learn",
              flush=True)
        for name in args.augmentations:
            run_settings = settings_for(home, seed, args.threads, AUGMENTATIONS[name], args.back_translation)
            started = time.monotonic()
            outcome = train_one(
                home, train, holdout, run_settings, warm_start=champion.version, sample_weight_column="weight",
                group_column="group", validation=validation, augment_column="augment",
            )
            sets = {"holdout": holdout, "new domain": test}
            result = _result("300 corrections", seed, name, outcome, sets=sets, started=started)
            results.append(result)
            print(f"  corrections seed {seed} {name:<16} new domain {_f1(test, result.predicted['new domain']):.4f} "
                  f"holdout {_f1(holdout, result.predicted['holdout']):.4f} (+{len(result.added)} rows, "
                  f"{result.seconds:.0f} s)", flush=True)
    return results


def _result(
    setting: str, seed: int, name: str, outcome: TrainingOutcome, *, sets: dict[str, pd.DataFrame], started: float
) -> Result:
    classifier = outcome.training.classifier(outcome.version.card.max_length)
    predicted = {key: predictions(classifier, frame["text"].tolist()) for key, frame in sets.items()}
    truth = {key: frame["label"].tolist() for key, frame in sets.items()}
    path = outcome.version.path / AUGMENTED_DATA_FILE
    added = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["text", "label", "augmented_from"])
    return Result(setting, seed, name, predicted, truth, added, time.monotonic() - started, outcome.training.steps_run)


def _f1(frame: pd.DataFrame, predicted: list[str]) -> float:
    return score(frame["label"].tolist(), predicted, sorted(frame["label"].unique())).macro_f1


def _macro_f1(result: Result, test_name: str) -> float:
    truth = result.truth[test_name]
    return score(truth, result.predicted[test_name], sorted(set(truth))).macro_f1


def report(results: list[Result], checker: Checker | None, sample: int) -> None:
    print(f"\n{'setting':<16} {'test set':<11} {'augmentation':<16} {'macro-F1':>8} {'vs none pts (95% CI)':>26} "
          f"{'rows added':>10} {'label agreement: new / source':>30}")
    wins: dict[str, list[bool]] = {}
    gains: dict[str, list[float]] = {}
    for setting in dict.fromkeys(r.setting for r in results):
        group = [r for r in results if r.setting == setting]
        for test_name in dict.fromkeys(key for r in group for key in r.predicted):
            for name in dict.fromkeys(r.augmentation for r in group):
                runs = sorted((r for r in group if r.augmentation == name), key=lambda r: r.seed)
                base = sorted((r for r in group if r.augmentation == "none"), key=lambda r: r.seed)
                f1 = float(np.mean([_macro_f1(r, test_name) for r in runs]))
                diff = ""
                if name != "none" and base:
                    # Seeds pooled: each run's rows beside the same seed's run without augmentation.
                    truth = [label for r in runs for label in r.truth[test_name]]
                    ours = [p for r in runs for p in r.predicted[test_name]]
                    theirs = [p for r in base for p in r.predicted[test_name]]
                    low, high = bootstrap_macro_f1(truth, ours, sorted(set(truth)), baseline=theirs)
                    mean = f1 - float(np.mean([_macro_f1(r, test_name) for r in base]))
                    diff = f"{mean * 100:+6.2f} [{low * 100:+6.2f}, {high * 100:+6.2f}]"
                    wins.setdefault(name, []).append(low > 0)
                    gains.setdefault(name, []).append(mean)
                added = int(np.mean([len(r.added) for r in runs]))
                agreement = ""
                if checker is not None and name != "none" and test_name == "holdout":
                    rows = pd.concat([r.added for r in runs], ignore_index=True)
                    rows = rows.sample(n=min(sample, len(rows)), random_state=0) if len(rows) else rows
                    new = checker.agreement(rows["text"].tolist(), rows["label"].tolist())
                    source = checker.agreement(rows["augmented_from"].tolist(), rows["label"].tolist())
                    agreement = f"{new:.3f} / {source:.3f} (n={len(rows)})"
                print(f"{setting:<16} {test_name:<11} {name:<16} {f1:>8.4f} {diff:>26} {added:>10} {agreement:>30}")
    print()
    for name, won in wins.items():
        print(f"{name}: better than none (95% interval above 0) in {sum(won)} of {len(won)} settings and test sets")
    # The default may be on only where an augmentation wins in every setting measured; the largest mean gain first.
    winners = sorted((name for name, won in wins.items() if won and all(won)), key=lambda n: -np.mean(gains[n]))
    best = f"{','.join(AUGMENTATIONS[winners[0]])} (in the settings measured here)" if winners else ""
    print(f"default: {'FLYWHEEL_AUGMENT=' + best if winners else 'off (no augmentation wins everywhere)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--sizes", default="100,300,1000", help="Training-set sizes, comma-separated ('' for none).")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--augmentations", default="none,synonym,insert,swap,delete,eda",
                        help="Comma-separated, from: " + ", ".join(AUGMENTATIONS))
    parser.add_argument("--new-domain", action="store_true", help="Also the 300 product-review corrections.")
    parser.add_argument("--back-translation", default="", help="Two translation models, there and back.")
    parser.add_argument("--agreement-sample", type=int, default=300, help="Augmented rows the checker labels.")
    parser.add_argument("--checker-rows", type=int, default=0, help="Rows the checker trains on (0: all unused).")
    parser.add_argument("--quick", action="store_true", help="Sizes 100,300, one seed, none/synonym/eda.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.seeds, args.augmentations = "100,300", 1, "none,synonym,eda"
    args.sizes = [int(size) for size in args.sizes.split(",") if size]
    args.augmentations = ["none", *(a for a in args.augmentations.split(",") if a and a != "none")]
    args.back_translation = [m for m in args.back_translation.split(",") if m]
    if "back_translation" in args.augmentations and len(args.back_translation) != 2:
        raise SystemExit("back_translation needs --back-translation FORWARD,BACK (two translation models)")
    unknown = sorted(set(args.augmentations) - set(AUGMENTATIONS))
    if unknown:
        raise SystemExit(f"unknown augmentation {unknown}; choose from {', '.join(AUGMENTATIONS)}")
    configure_logging("WARNING")
    torch.set_num_threads(args.threads)

    corpus = load_dataset(args.data).sample(frac=1.0, random_state=1234).reset_index(drop=True)
    holdout = corpus.iloc[:HOLDOUT_ROWS].reset_index(drop=True)
    pool = corpus.iloc[HOLDOUT_ROWS : HOLDOUT_ROWS + POOL_ROWS].reset_index(drop=True)
    unused = corpus.iloc[HOLDOUT_ROWS + POOL_ROWS :].reset_index(drop=True)
    print(f"golden holdout {len(holdout)} movie reviews, pool {len(pool)}, label checker trained on {len(unused)}; "
          f"threads {args.threads}", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as scratch:
        results += small_sets(args, pool, holdout, Path(scratch))
        if args.new_domain:
            results += new_domain(args, pool, holdout, Path(scratch))
    checker = None
    if any(len(r.added) for r in results):
        from sentence_transformers import SentenceTransformer

        # The real all-MiniLM-L6-v2 whatever base model the runs fine-tune: the checker must be strong.
        encoder = SentenceTransformer(resolve_base_model(DEFAULT_BASE_MODEL), device="cpu")
        checker = Checker(encoder).fit(unused.iloc[: args.checker_rows or len(unused)])
        print(f"label checker: {checker.agreement(holdout['text'].tolist(), holdout['label'].tolist()):.3f} "
              "accuracy on the golden holdout", flush=True)
    report(results, checker, args.agreement_sample)


if __name__ == "__main__":
    main()
