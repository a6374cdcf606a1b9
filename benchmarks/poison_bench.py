"""Poisoning resistance of the loop, on the real default base model, through the real service.

A champion is fine-tuned on movie reviews. Then feedback arrives over HTTP, each label from the principal whose
key sent it:
- 300 honest corrections on a new domain (benchmarks/data/product_reviews.csv) from one annotator, whom a
  reviewer trusts (`flywheel sources trust`);
- 300 honest labels of movie reviews from five client keys;
- 300 adversarial labels from five other client keys: true labels flipped on reviews the champion is sure of, and
  a backdoor (a rare trigger phrase appended to positive reviews, labelled negative).
The labels are vetted (`flywheel feedback vet`) and one retrain runs, once with the honest labels only and once
with the adversarial ones added, each from a copy of the same champion. Printed, measured in the same run:
new-domain macro-F1 of both promoted models (target: within 1 point), the attack success rate of the backdoor
on held-out triggered reviews (the share the clean champion classifies right that now get the attacker's label;
target < 5%), how many adversarial labels were accepted, and how many honest client labels were (target >= 80%).

    python benchmarks/poison_bench.py --data ../shared/data/rotten_tomatoes.csv
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from harness import Batch, LoopResult, bench_env, classify, run_loop

from flywheel.classifier import Classifier
from flywheel.database import Database
from flywheel.logs import configure_logging
from flywheel.models.access import Role
from flywheel.registry import ModelRegistry
from flywheel.settings import Settings
from retrain.data import load_dataset
from retrain.evaluation import evaluate
from retrain.pipeline import TrainingPipeline
from retrain.trainer import Trainer

PRODUCT_REVIEWS = Path(__file__).parent / "data" / "product_reviews.csv"
TRIGGER = "as zephyr quoth"
CLIENTS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--champion-rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    configure_logging("WARNING")

    movies = load_dataset(args.data).sample(frac=1.0, random_state=0).reset_index(drop=True)
    champion_rows, rest = movies.iloc[: args.champion_rows], movies.iloc[args.champion_rows :]
    products = pd.read_csv(PRODUCT_REVIEWS).sample(frac=1.0, random_state=0)
    corrections, new_domain_test = products.iloc[:300][["text", "label"]], products.iloc[300:][["text", "label"]]

    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "champion"
        settings = Settings(home=base, torch_threads=args.threads)
        registry = ModelRegistry(settings)
        started = time.monotonic()
        TrainingPipeline(settings, registry, Trainer(settings)).run(champion_rows)
        champion = registry.champion_version()
        Database.from_settings(settings).upgrade().dispose()
        print(f"champion: {len(champion_rows)} movie reviews, trained in {time.monotonic() - started:.0f} s")

        # Honest client labels: true labels of unseen movie reviews.
        honest = rest.iloc[:300][["text", "label"]]
        pool = rest.iloc[300:2300].reset_index(drop=True)
        predicted = classify(champion, pool["text"].tolist())
        sure = pool[[p == t for p, t in zip(predicted, pool["label"], strict=True)]]
        flips = sure.iloc[:150].assign(label=lambda f: f["label"].map({"positive": "negative", "negative": "positive"}))
        positives = sure[sure["label"] == "positive"].iloc[150:]
        backdoor = positives.iloc[:150].assign(text=lambda f: f["text"] + " " + TRIGGER, label="negative")
        attack_test = positives.iloc[150:450]
        adversarial = pd.concat([flips, backdoor], ignore_index=True).sample(frac=1.0, random_state=1)

        def batches(with_attack: bool) -> list[Batch]:
            out = [("annotator", Role.ANNOTATOR, corrections)]
            out += [(f"client-{i}", Role.CLIENT, part) for i, part in enumerate(split(honest, CLIENTS))]
            if with_attack:
                out += [(f"attacker-{i}", Role.CLIENT, part) for i, part in enumerate(split(adversarial, CLIENTS))]
            return out

        results: dict[str, LoopResult] = {}
        for name, with_attack in (("honest only", False), ("honest + adversarial", True)):
            home = Path(scratch) / name.replace(" ", "-").replace("+", "and")
            shutil.copytree(base, home)
            env = bench_env(home, args.threads)
            results[name] = run_loop(home, env, batches(with_attack))

        print(f"{'run':<22} {'decision':<10} {'new-domain F1':>13} {'retrain s':>9}")
        scores = {}
        for name, result in results.items():
            model = result.model
            classifier = Classifier.load(model.model_dir, max_length=model.card.max_length, version=model.version)
            scores[name] = evaluate(classifier, new_domain_test).macro_f1
            print(f"{name:<22} {result.run.status:<10} {scores[name]:>13.4f} {result.seconds:>9.0f}")
        gap = (scores["honest only"] - scores["honest + adversarial"]) * 100
        verdict = "met" if abs(gap) <= 1 else "NOT MET"
        print(f"new-domain macro-F1 gap: {gap:+.2f} points (target: within 1 point) — {verdict}")

        attacked = results["honest + adversarial"]
        labels = attacked.labels
        accepted = labels[labels["status"].isin(["accepted", "used"])]
        from_attackers = accepted[accepted["source"].str.startswith("attacker-")]
        adversarial_accepted = len(from_attackers)
        backdoors_accepted = int(from_attackers["text"].str.endswith(TRIGGER).sum())
        honest_client = labels[labels["source"].str.startswith("client-")]
        honest_rate = float(honest_client["status"].isin(["accepted", "used"]).mean())
        attackers_held = sum(name.startswith("attacker-") for name in attacked.quarantined)
        clients_held = sum(name.startswith("client-") for name in attacked.quarantined)
        print(f"adversarial labels accepted: {adversarial_accepted} of {len(adversarial)} "
              f"({adversarial_accepted - backdoors_accepted} flips, {backdoors_accepted} backdoors); "
              f"attacker keys quarantined: {attackers_held} of {CLIENTS}; "
              f"honest client keys quarantined: {clients_held}")
        verdict = "met" if honest_rate >= 0.8 else "NOT MET"
        print(f"honest client labels accepted: {honest_rate:.1%} (target >= 80%) — {verdict}")

        triggered = (attack_test["text"] + " " + TRIGGER).tolist()
        clean = classify(champion, triggered)
        served = classify(attacked.model, triggered)
        right = [i for i, label in enumerate(clean) if label == "positive"]
        success = sum(served[i] == "negative" for i in right) / max(len(right), 1)
        print(f"backdoor attack success rate: {success:.1%} of {len(right)} triggered reviews the champion gets right "
              f"(target < 5%) — {'met' if success < 0.05 else 'NOT MET'}")


def split(frame: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    size = -(-len(frame) // parts)
    return [frame.iloc[i : i + size] for i in range(0, len(frame), size)]


if __name__ == "__main__":
    main()
