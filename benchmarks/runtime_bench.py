"""What each inference runtime keeps of the model's labels, and what it buys in speed, on texts never trained on.

The champion of ``--home`` (or MiniLM fine-tuned with the default training on ``--train-rows`` rows of ``--data``,
which registers its runtimes) is run on ``--texts`` held-out reviews (rows of ``--data`` outside its training set)
in PyTorch fp32 (the reference), ONNX fp32, plain dynamic int8 (ONNX Runtime's ``quantize_dynamic`` with
per-channel weights: the baseline a user would write, and registration's first int8 recipe) and SmoothQuant int8
(its second: calibrated on 512 training texts, the feed-forward outputs kept fp32), both built here from the
version's fp32 graph. Printed per runtime: label agreement with PyTorch fp32 (95% Wilson interval), macro-F1 on the
true labels and its difference from fp32 (paired-bootstrap 95% interval), texts/s (all texts at once, ordered by
token count, in passes of the service's size) and the ratio to ONNX fp32. Target: SmoothQuant int8 agreement >= 99%
and macro-F1 within 0.5 points of fp32, what the runtime gate (``FLYWHEEL_RUNTIME_MIN_AGREEMENT``,
``FLYWHEEL_RUNTIME_MAX_F1_DROP``) demands before int8 may serve.

    python benchmarks/runtime_bench.py --home /tmp/rb/home --data ../shared/data/rotten_tomatoes.csv
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from servers import prepare_model
from sklearn.metrics import f1_score

from flywheel.classifier import Classifier
from flywheel.quantization import CALIBRATION_TEXTS, quantize
from flywheel.runtime import ONNX_FILE, load_classifier, onnx_inputs, session
from flywheel.settings import Settings
from retrain.data import load_dataset
from retrain.replay import wilson
from service.serving import CPU_FORWARD_BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="Flywheel home (a champion is trained when none)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"))
    parser.add_argument("--train-rows", type=int, default=2000, help="rows of --data the champion is trained on")
    parser.add_argument("--texts", type=int, default=2000, help="held-out texts measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    entry = prepare_model(args, args.home)
    settings = Settings(home=args.home, torch_threads=args.threads)
    trained = set(pd.read_parquet(entry.training_data_path)["text"])
    data = load_dataset(args.data)
    held_out = data[~data["text"].isin(trained)].sample(n=args.texts, random_state=args.seed)
    texts, truth = held_out["text"].tolist(), held_out["label"].astype(str).to_numpy()
    print(f"champion {entry.version} (card: {entry.card.runtime}); {len(texts)} held-out texts, {args.threads} threads")

    reference = load_classifier(entry, settings.model_copy(update={"runtime": "torch"}))
    train = pd.read_parquet(entry.training_data_path)["text"]
    calibration = train.sample(n=min(CALIBRATION_TEXTS, len(train)), random_state=settings.seed).tolist()
    built = {}
    for recipe in ("dynamic", "smoothquant"):
        built[recipe] = args.home / f"bench.{recipe}.int8.onnx"
        started = time.perf_counter()
        smooth = recipe != "dynamic"
        quantize(entry.model_dir / ONNX_FILE, built[recipe], onnx_inputs(reference), calibration, smooth=smooth)
        print(f"{recipe} int8 built in {time.perf_counter() - started:.1f} s")
    evidence = entry.card.runtime_evidence
    variants_seen = evidence.get("variants", [])
    chosen: dict[str, object] = next((v for v in variants_seen if v["runtime"] == entry.card.runtime), {})
    print(f"the card chose {entry.card.runtime} {chosen.get('recipe', '')} on its {evidence.get('texts')} texts")
    variants = {
        "torch fp32": reference,
        "onnx fp32": _onnx(reference, entry.model_dir / ONNX_FILE, "onnx"),
        "plain dynamic int8": _onnx(reference, built["dynamic"], "onnx-int8"),
        "smoothquant int8": _onnx(reference, built["smoothquant"], "onnx-int8"),
    }
    labels = {name: _run(classifier, texts) for name, classifier in variants.items()}
    base_labels, base_speed = labels["torch fp32"][0], labels["onnx fp32"][1]
    names = np.asarray(reference.labels)
    base_f1 = f1_score(truth, names[base_labels], average="macro")
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(texts), size=(500, len(texts)))
    print("| runtime | agreement (95% CI) | macro-F1 | vs fp32 (95% CI) | texts/s | vs onnx fp32 |")
    print("|---|---|---|---|---|---|")
    for name, (predicted, speed) in labels.items():
        same = int((predicted == base_labels).sum())
        low, high = wilson(same, len(texts))
        f1 = f1_score(truth, names[predicted], average="macro")
        gaps = [
            f1_score(truth[d], names[predicted][d], average="macro")
            - f1_score(truth[d], names[base_labels][d], average="macro")
            for d in draws
        ]
        print(
            f"| {name} | {same / len(texts):.2%} ({low:.2%}-{high:.2%}) | {f1:.4f} | {(f1 - base_f1) * 100:+.2f} pts "
            f"({np.percentile(gaps, 2.5) * 100:+.2f}, {np.percentile(gaps, 97.5) * 100:+.2f}) | {speed:.1f} | "
            f"{speed / base_speed:.2f}x |"
        )
    ours = labels["smoothquant int8"][0]
    agreement = float((ours == base_labels).mean())
    drop = (base_f1 - f1_score(truth, names[ours], average="macro")) * 100
    met = agreement >= settings.runtime_min_agreement and drop <= settings.runtime_max_f1_drop * 100
    print(
        "smoothquant int8 agreement >= 99% and macro-F1 drop <= 0.5 pts: "
        f"{'met' if met else 'NOT MET'} ({agreement:.2%}, {drop:+.2f} pts)"
    )


def _onnx(reference: Classifier, path: Path, runtime: str) -> Classifier:
    model, tokenizer, length = reference.model, reference.tokenizer, reference.max_length
    return Classifier(model, tokenizer, length, session=session(path), runtime=runtime)


def _run(classifier: Classifier, texts: list[str]) -> tuple[np.ndarray, float]:
    """Predicted label indices of ``texts`` and texts/s, all texts at once: the classifier orders them by token
    count and cuts passes of at most the service's CPU forward batch."""
    classifier.predict_proba(texts[:CPU_FORWARD_BATCH], batch_size=CPU_FORWARD_BATCH)
    started = time.perf_counter()
    probs = classifier.predict_proba(texts, batch_size=CPU_FORWARD_BATCH).probs
    return probs.argmax(axis=1), len(texts) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
