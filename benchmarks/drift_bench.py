"""Time a full drift report (10,000 reference, 5,000 current texts) with cached reference embeddings.

The serving model is the real default base model (all-MiniLM-L6-v2) with a seeded two-label head, registered in
a temporary state directory with the reference rows as its training data. Cases, each a full report:

- ``unperturbed``: 5,000 texts sampled from the same file (the file has only 10,752 rows, so most of them are
  also in the 10,000-row reference);
- ``perturbed``: the same 5,000 texts moved to another domain (product reviews instead of film reviews);
- ``disjoint``: a second model version whose reference is every row not in the current sample (5,752 rows),
  against the unperturbed 5,000: a no-drift check with no shared texts.

Baseline, measured in the same run: the first report of the version, which embeds the reference itself
(what every report would cost without the per-version cache).

    python benchmarks/drift_bench.py --data ../shared/data/rotten_tomatoes.csv [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from flywheel.classifier import Classifier
from flywheel.events import new_id, utcnow
from flywheel.holdout import GoldenHoldout
from flywheel.logs import configure_logging
from flywheel.registry import ModelCard, ModelRegistry, ModelVersion
from flywheel.settings import DEFAULT_BASE_MODEL, Settings
from monitoring.monitor import DriftMonitor, DriftOutcome
from monitoring.window import CurrentWindow
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


def window(classifier: Classifier, texts: list[str], version: str) -> CurrentWindow:
    """A current window as the feedback store would return it, with the model's logged predictions."""
    probs = classifier.predict_proba(texts).probs
    now = utcnow()
    frame = pd.DataFrame(
        {
            "prediction_id": [new_id() for _ in texts],
            "text": texts,
            "predicted": [LABELS[i] for i in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1).astype(float),
            "model_version": version,
            "created_at": now,
            "feedback_label": None,
        }
    )
    return CurrentWindow(frame=frame, rule=f"benchmark: {len(texts)} texts", start=now, end=now)


def report_line(case: str, outcome: DriftOutcome, wall: float, cpu: float) -> str:
    """One printed line per report (CPU time counts every thread of this process)."""
    s = outcome.summary
    t = s.timings
    return (
        f"{case:<24} {s.reference_rows:>6} {s.current_rows:>6}  wall {wall:6.1f}s  cpu {cpu:6.1f}s"
        f"  reference {t['reference_seconds']:5.1f}s  embedding {t['embedding_seconds']:5.1f}s"
        f"  evidently {t['evidently_seconds']:5.1f}s  targeting {t['targeting_seconds']:4.1f}s"
        f"  verdict {s.verdict:<9} fired: {', '.join(s.fired) or '-'}"
    )


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
        settings = Settings(home=Path(home), torch_threads=args.threads, seed=args.seed)
        registry = ModelRegistry(settings)
        model_dir = resolve_base_model(args.model)
        entry = register(registry, model_dir, reference, args.seed)
        registry.promote(entry.version, reason="benchmark")
        GoldenHoldout(settings.home / "holdout").freeze(reference.head(500))
        monitor = DriftMonitor(settings, registry)
        classifier = monitor.classifier(entry)
        windows = {
            "unperturbed": window(classifier, current["text"].tolist(), entry.version),
            "perturbed": window(classifier, perturbed, entry.version),
        }
        print(f"{'case':<24} {'ref':>6} {'cur':>6}")

        started, cpu = time.perf_counter(), time.process_time()
        cold = monitor.evaluate(windows["unperturbed"], entry)
        cold_wall = time.perf_counter() - started
        print(report_line("baseline: uncached ref", cold, cold_wall, time.process_time() - cpu))
        walls: dict[str, float] = {}
        outcomes: dict[str, DriftOutcome] = {}
        for case, win in windows.items():
            started, cpu = time.perf_counter(), time.process_time()
            outcomes[case] = monitor.evaluate(win, entry)
            walls[case] = time.perf_counter() - started
            print(report_line(f"{case} (cached ref)", outcomes[case], walls[case], time.process_time() - cpu))

        if not args.no_disjoint:
            rest = data.drop(index=current.index).head(args.reference)
            second = register(registry, model_dir, rest, args.seed)
            # Build (and cache) the second version's reference and calibration outside the timed report.
            monitor.prepare(second)
            frame = windows["unperturbed"].frame.assign(model_version=second.version)
            disjoint_window = CurrentWindow(frame=frame, rule="benchmark: disjoint", start=utcnow(), end=utcnow())
            started, cpu = time.perf_counter(), time.process_time()
            outcomes["disjoint"] = monitor.evaluate(disjoint_window, second)
            walls["disjoint"] = time.perf_counter() - started
            used = time.process_time() - cpu
            print(report_line("disjoint (cached ref)", outcomes["disjoint"], walls["disjoint"], used))

    expected = {"unperturbed": "no_drift", "perturbed": "drifted", "disjoint": "no_drift"}
    correct = all(outcomes[c].summary.verdict == expected[c] for c in outcomes)
    warm = walls["perturbed"]
    print(
        f"\nfull report with cached reference: {walls['unperturbed']:.1f}s unperturbed, {warm:.1f}s perturbed "
        f"(target <= 60s); baseline without the cache {cold_wall:.1f}s -> "
        f"{cold_wall / max(walls['unperturbed'], 1e-9):.2f}x faster with it"
    )
    print(
        f"verdicts {'correct' if correct else 'WRONG'}: "
        + ", ".join(f"{c}={o.summary.verdict}" for c, o in outcomes.items())
        + f"; load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
