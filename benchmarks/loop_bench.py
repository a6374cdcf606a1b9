"""The whole loop on the real default base model: do 300 corrections on a new domain make the served model better?

For each seed a champion is fine-tuned with the default settings on movie reviews. For each new domain (the
hand-written product reviews and support tickets in benchmarks/data), a copy of that champion's home gets 300
corrections over HTTP from an annotator key that a reviewer trusts (`flywheel sources trust`); the labels are vetted
and one retrain runs with the default settings, every candidate included. Scored, with paired-bootstrap 95%
intervals of each difference: new-domain macro-F1 on that domain's held-out rows (never trained on), and old-domain
macro-F1 on 2,000 movie reviews disjoint from every training set, for the champion and for the model served after
the run. The baseline is the champion, measured in the same run.

Targets, with default settings, in each domain and seed: new-domain macro-F1 +15 points or more, old-domain loss at
most 0.5 points, promoted, the retrain (every candidate) within 15 minutes. With `--flip 0.3` the same corrections
arrive with 30% of their labels flipped at random; then the target is that the served model is no worse than the
champion on either set.

    python benchmarks/loop_bench.py --data ../shared/data/rotten_tomatoes.csv --seeds 3
    python benchmarks/loop_bench.py --data ../shared/data/rotten_tomatoes.csv --seeds 3 --flip 0.3

`--task intents` and `--task finance3` run the same loop on one of the hand-written N-label sets in benchmarks/data
(support_intents.csv: ten customer-service intents; finance_headlines.csv: positive / neutral / negative headlines).
Per seed the set is split, stratified by label, into the champion's part (35%), corrections (40%, at most
--corrections) and the held-out test (the rest, never trained on); reported are macro-F1 and per-class F1 of the
champion and of the served model on the held-out rows with the gain per class, the gate's decision and its per-class
lines from the run record. With no second domain, "old domain" there is the champion's own golden holdout.

With `--new-labels`, the champion is trained without the labels it names (intents that appear after launch, a
`neutral` class added to a two-way desk): an admin allows them with `flywheel labels add` before the corrections
arrive, and the retrain has to grow the head. Their per-class lines show the gain (the champion's F1 on a label it
lacks is 0), and the per-class gate skips them on the golden holdout, which was frozen without them.

    python benchmarks/loop_bench.py --task finance3 --seeds 1
    python benchmarks/loop_bench.py --task intents --seeds 3
    python benchmarks/loop_bench.py --task intents --seeds 3 --new-labels account_locked,speak_to_human
    python benchmarks/loop_bench.py --task finance3 --seeds 3 --new-labels neutral
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from harness import bench_env, classify, run_loop

from flywheel.database import Database
from flywheel.holdout import GoldenHoldout, stratified_split
from flywheel.logs import configure_logging
from flywheel.models.access import Role
from flywheel.models.retrain import RetrainRunPublic
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.settings import Settings
from retrain.data import load_dataset
from retrain.evaluation import bootstrap_macro_f1, score
from retrain.gate import allowed_drop
from retrain.pipeline import TrainingPipeline, validation_data
from retrain.trainer import Trainer

DATA = Path(__file__).parent / "data"
DOMAINS = {"products": DATA / "product_reviews.csv", "support": DATA / "support_tickets.csv"}
#: The hand-written N-label sets of ``--task``; each is split into champion rows, corrections and held-out rows.
TASKS = {"intents": DATA / "support_intents.csv", "finance3": DATA / "finance_headlines.csv"}
CHAMPION_SHARE, CORRECTION_SHARE = 0.35, 0.40
OLD_DOMAIN_ROWS = 2000
FLIPPED = {"positive": "negative", "negative": "positive"}


@dataclass
class Outcome:
    seed: int
    domain: str
    status: str
    champion_new: float
    served_new: float
    new_interval: tuple[float, float]
    champion_old: float
    served_old: float
    old_interval: tuple[float, float]
    retrain_seconds: float
    chosen: str
    #: The champion and every candidate the run trained, scored by ``score_candidates``.
    candidates: list[dict[str, object]]

    @property
    def gain(self) -> float:
        return self.served_new - self.champion_new

    @property
    def loss(self) -> float:
        return self.champion_old - self.served_old


def compare(champion: ModelVersion, served: ModelVersion, frame: pd.DataFrame, seed: int, *,
            own_labels: bool = False) -> tuple[float, float, tuple[float, float]]:
    """Macro-F1 of both models on ``frame`` and the paired-bootstrap 95% interval of the served model's difference,
    over every label either model has (a label the champion lacks counts as one it never gets right), or with
    ``own_labels`` over the labels ``frame`` has, as the gate scores a holdout frozen before a label was added (a
    wrong guess of the new label still costs its row's class)."""
    truth = frame["label"].tolist()
    labels = sorted(set(truth)) if own_labels else both_labels(champion, served, frame)
    before = classify(champion, frame["text"].tolist())
    after = before if served.version == champion.version else classify(served, frame["text"].tolist())
    interval = bootstrap_macro_f1(truth, after, labels, baseline=before, seed=seed)
    return score(truth, before, labels).macro_f1, score(truth, after, labels).macro_f1, interval


def score_candidates(registry: ModelRegistry, run: RetrainRunPublic, champion: ModelVersion,
                     sets: dict[str, pd.DataFrame]) -> list[dict[str, object]]:
    """Every candidate a run trained, served or not, and the champion: the gate's figures (held-out feedback slice,
    golden holdout) beside macro-F1 on each of ``sets``, so that a choice among them can be judged afterwards."""
    rows: list[dict[str, object]] = []
    champion_metrics = run.champion_metrics or {}
    records = [{"name": "champion", "version": champion.version,
                "feedback_macro_f1": (champion_metrics.get("feedback") or {}).get("macro_f1"),
                "holdout_macro_f1": champion.card.holdout_metrics.get("macro_f1")}, *(run.candidates or [])]
    for record in records:
        if "version" not in record:
            continue
        version = registry.get(str(record["version"]))
        row: dict[str, object] = {"name": record["name"], "slice": record.get("feedback_macro_f1"),
                                  "holdout": record.get("holdout_macro_f1")}
        for name, frame in sets.items():
            predicted = classify(version, frame["text"].tolist())
            row[name] = score(frame["label"].tolist(), predicted, version.card.labels).macro_f1
        rows.append(row)
    return rows


@dataclass
class TaskOutcome:
    """One seed of an N-label task: held-out and golden-holdout scores of both models, the gate, wall times."""

    seed: int
    status: str
    chosen: str
    reason: str
    champion_new: float
    served_new: float
    new_interval: tuple[float, float]
    champion_old: float
    served_old: float
    old_interval: tuple[float, float]
    #: Per-class F1 on the held-out rows: label -> (champion, served).
    classes: dict[str, tuple[float, float]]
    champion_seconds: float
    loop_seconds: float
    retrain_seconds: float
    gate_lines: list[str] = field(default_factory=list)


def split_task(frame: pd.DataFrame, seed: int, cap: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Champion rows, corrections and held-out rows of a shipped set, each stratified by label, none overlapping."""
    rest, champion = stratified_split(frame, CHAMPION_SHARE, seed, "champion")
    corrections_n = min(round(len(frame) * CORRECTION_SHARE), cap)
    held_out, corrections = stratified_split(rest, corrections_n / len(rest), seed, "corrections")
    return champion, corrections, held_out


def both_labels(champion: ModelVersion, served: ModelVersion, frame: pd.DataFrame) -> list[str]:
    """The champion's labels, then those only the served model or the rows have (labels added through feedback)."""
    others = [*served.card.labels, *sorted(frame["label"].unique())]
    return list(dict.fromkeys([*champion.card.labels, *others]))


def per_class_f1(champion: ModelVersion, served: ModelVersion, frame: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Each label's F1 on ``frame`` for the champion and the served model (0 for a label a model lacks)."""
    truth, labels = frame["label"].tolist(), both_labels(champion, served, frame)
    before = score(truth, classify(champion, frame["text"].tolist()), labels)
    after = before if served.version == champion.version else score(
        truth, classify(served, frame["text"].tolist()), labels)
    return {label: (before.per_class[label].f1, after.per_class[label].f1) for label in labels}


def gate_lines(run: RetrainRunPublic, max_class_drop: float) -> list[str]:
    """The run record's per-class gate figures: each candidate's F1 per class on the retained rows against the
    champion's, and whether the drop exceeds the gate's per-class limit for a class of that many rows (it refuses only
    a drop the retained rows can tell from noise: the record's reason says which)."""
    retained = ((run.champion_metrics or {}).get("retained") or {}).get("per_class") or {}
    champion = {label: float(m["f1"]) for label, m in retained.items()}
    rows = {label: int(m["support"]) for label, m in retained.items()}
    lines = []
    for record in run.candidates or []:
        if record.get("skipped"):
            lines.append(f"{record.get('name')!s:<6} not trained: {record['skipped']}")
            continue
        classes = record.get("holdout_class_f1") or {}
        cells = []
        for label, before in sorted(champion.items()):
            after = float(classes.get(label, 0.0))
            mark = " over limit" if before - after > allowed_drop(max_class_drop, rows[label]) else ""
            cells.append(f"{label} {before:.3f}->{after:.3f} ({(after - before) * 100:+.1f}){mark}")
        kept = record.get("refused") or "kept (holdout and every class within the limits)"
        lines.append(f"{record.get('name')!s:<6} on {record.get('holdout_rows', '?')} retained rows: "
                     + ", ".join(cells) + f"; retained-rows check: {kept}")
    return lines


def run_task(args: argparse.Namespace) -> None:
    """The loop on one shipped N-label set, once per seed; then the table of gains per class."""
    from tests.conftest import run_cli

    frame = pd.read_csv(TASKS[args.task])[["text", "label"]]
    new_labels = [name.strip() for name in args.new_labels.split(",") if name.strip()]
    unknown = sorted(set(new_labels) - set(frame["label"]))
    if unknown:
        raise SystemExit(f"--new-labels names labels {TASKS[args.task].name} does not have: {', '.join(unknown)}")
    outcomes: list[TaskOutcome] = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows, corrections, held_out = split_task(frame, seed, args.corrections)
            # New labels: the champion never saw them; they arrive as corrections once an admin allows them.
            rows = rows[~rows["label"].isin(new_labels)]
            base, home = Path(scratch) / f"champion-{seed}", Path(scratch) / f"{args.task}-{seed}"
            settings = Settings(home=base, torch_threads=args.threads, seed=seed)
            registry = ModelRegistry(settings)
            started = time.monotonic()
            TrainingPipeline(settings, registry, Trainer(settings, progress=False)).run(rows)
            champion_seconds = time.monotonic() - started
            Database.from_settings(settings).upgrade().dispose()
            champion = registry.champion_version()
            golden = GoldenHoldout(base / "holdout").load()[["text", "label"]]
            print(f"seed {seed}: champion on {len(rows)} rows of {TASKS[args.task].name} ({len(golden)} of them its "
                  f"golden holdout), trained in {champion_seconds:.0f} s; {len(corrections)} corrections, "
                  f"{len(held_out)} held-out rows", flush=True)
            shutil.copytree(base, home)
            env = {**bench_env(home, args.threads), "FLYWHEEL_SEED": str(seed)}
            for name in new_labels:
                added = run_cli(env, "labels", "add", name, "--note", "loop_bench --new-labels")
                if added.returncode != 0:
                    raise SystemExit(f"flywheel labels add {name} failed: {added.stderr}")
            started = time.monotonic()
            result = run_loop(home, env, [("annotator", Role.ANNOTATOR, corrections)])
            loop_seconds = time.monotonic() - started
            new = compare(champion, result.model, held_out, seed)
            old = compare(champion, result.model, golden, seed, own_labels=True)
            chosen = str((result.run.gate_evidence or {}).get("chosen", "-"))
            outcome = TaskOutcome(
                seed, result.run.status, chosen, result.run.reason or "", new[0], new[1], new[2], old[0], old[1],
                old[2], per_class_f1(champion, result.model, held_out), champion_seconds, loop_seconds,
                result.seconds, gate_lines(result.run, Settings(home=home).retrain_max_class_drop))
            outcomes.append(outcome)
            print(f"  {result.run.status} ({chosen}) — held-out macro-F1 {outcome.champion_new:.4f} -> "
                  f"{outcome.served_new:.4f}, golden holdout {outcome.champion_old:.4f} -> {outcome.served_old:.4f}; "
                  f"loop {loop_seconds:.0f} s, retrain {result.seconds:.0f} s; {outcome.reason}", flush=True)

    print(f"\ntask {args.task}: held-out = rows never trained on; old domain = the champion's own golden holdout "
          "(no second domain exists for this task)")
    print(f"{'seed':>4} {'decision':<9} {'chosen':<7} {'held-out: champion':>18} {'served':>7} "
          f"{'gain pts (95% CI)':>24} {'golden: champion':>16} {'served':>7} {'change pts (95% CI)':>24} "
          f"{'champion s':>10} {'loop s':>6} {'retrain s':>9}")
    for o in outcomes:
        print(f"{o.seed:>4} {o.status:<9} {o.chosen:<7} {o.champion_new:>18.4f} {o.served_new:>7.4f} "
              f"{(o.served_new - o.champion_new) * 100:>+7.2f} [{o.new_interval[0] * 100:+6.2f}, "
              f"{o.new_interval[1] * 100:+6.2f}] {o.champion_old:>16.4f} {o.served_old:>7.4f} "
              f"{(o.served_old - o.champion_old) * 100:>+7.2f} [{o.old_interval[0] * 100:+6.2f}, "
              f"{o.old_interval[1] * 100:+6.2f}] {o.champion_seconds:>10.0f} {o.loop_seconds:>6.0f} "
              f"{o.retrain_seconds:>9.0f}")
    labels = list(outcomes[0].classes)
    print("\nper-class F1 on the held-out rows: champion -> served (gain pts)")
    print(f"{'class':<16} " + " ".join(f"{'seed ' + str(o.seed):>24}" for o in outcomes) + f" {'mean gain':>10}")
    for label in labels:
        cells = " ".join(f"{o.classes[label][0]:.3f} -> {o.classes[label][1]:.3f} "
                         f"({(o.classes[label][1] - o.classes[label][0]) * 100:+6.1f})" for o in outcomes)
        mean = np.mean([o.classes[label][1] - o.classes[label][0] for o in outcomes]) * 100
        print(f"{label:<16} {cells} {mean:>+10.1f}")
    print("\nthe gate's per-class lines (run record: F1 per class on the retained rows, champion -> candidate)")
    for o in outcomes:
        for line in o.gate_lines:
            print(f"  seed {o.seed}: {line}")
    lost = sorted({label for o in outcomes for label, (a, b) in o.classes.items() if b < a})
    print(f"\n{args.task}: mean held-out gain {np.mean([o.served_new - o.champion_new for o in outcomes]) * 100:+.2f} "
          f"pts, mean golden-holdout change {np.mean([o.served_old - o.champion_old for o in outcomes]) * 100:+.2f} "
          f"pts; {sum(o.status == 'promoted' for o in outcomes)} of {len(outcomes)} seeds promoted; classes that "
          f"lost held-out F1 in some seed: {', '.join(lost) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["sentiment", *TASKS], default="sentiment",
                        help="sentiment: movie-review champion, new-domain corrections; intents / finance3: the loop "
                        "on one shipped N-label set.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/rotten_tomatoes.csv"),
                        help="Movie reviews (the sentiment task only).")
    parser.add_argument("--champion-rows", type=int, default=2000, help="Movie reviews each champion is trained on.")
    parser.add_argument("--corrections", type=int, default=300, help="New-domain corrections sent as feedback.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="Run seeds first-seed .. first-seed+seeds-1.")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="Comma-separated: " + ", ".join(DOMAINS))
    parser.add_argument("--flip", type=float, default=0.0, help="Share of correction labels flipped at random.")
    parser.add_argument("--old-domain-rows", type=int, default=OLD_DOMAIN_ROWS,
                        help="Movie reviews, disjoint from every training set, that measure forgetting.")
    parser.add_argument("--new-labels", default="",
                        help="Task only, comma-separated labels the champion is trained without: an admin allows them "
                        "(`flywheel labels add`) and they arrive as corrections, so the retrain grows the head.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--self-training", action="store_true",
                        help="Turn FLYWHEEL_RETRAIN_SELF_TRAINING on; the champion first serves the new domain's "
                        "held-out texts, unlabeled, as the traffic self-training reads (transductive: their labels "
                        "are never used, but the texts scored are the texts pseudo-labeled).")
    args = parser.parse_args()
    configure_logging("WARNING")
    if args.self_training:
        # Every Settings() of this process (the retrain runner's included) and the CLI commands read it.
        os.environ["FLYWHEEL_RETRAIN_SELF_TRAINING"] = "true"
    if args.task != "sentiment":
        run_task(args)
        return

    movies = load_dataset(args.data).sample(frac=1.0, random_state=0).reset_index(drop=True)
    old_domain, pool = movies.iloc[: args.old_domain_rows], movies.iloc[args.old_domain_rows :]
    domains = {name: pd.read_csv(DOMAINS[name]) for name in args.domains.split(",")}
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            base = Path(scratch) / f"champion-{seed}"
            settings = Settings(home=base, torch_threads=args.threads, seed=seed)
            registry = ModelRegistry(settings)
            started = time.monotonic()
            rows = pool.sample(n=args.champion_rows, random_state=seed)
            TrainingPipeline(settings, registry, Trainer(settings, progress=False)).run(rows)
            Database.from_settings(settings).upgrade().dispose()
            champion = registry.champion_version()
            print(f"seed {seed}: champion on {len(rows)} movie reviews, trained in {time.monotonic() - started:.0f} s",
                  flush=True)
            for name, frame in domains.items():
                shuffled = frame.sample(frac=1.0, random_state=seed)[["text", "label"]]
                corrections, held_out = shuffled.iloc[: args.corrections].copy(), shuffled.iloc[args.corrections :]
                if args.flip:
                    flip = corrections.sample(frac=args.flip, random_state=seed).index
                    corrections.loc[flip, "label"] = corrections.loc[flip, "label"].map(FLIPPED)
                home = Path(scratch) / f"{name}-{seed}"
                shutil.copytree(base, home)
                env = {**bench_env(home, args.threads), "FLYWHEEL_SEED": str(seed)}
                traffic = held_out["text"].tolist() if args.self_training else None
                result = run_loop(home, env, [("annotator", Role.ANNOTATOR, corrections)], traffic=traffic)
                new = compare(champion, result.model, held_out, seed)
                old = compare(champion, result.model, old_domain, seed)
                chosen = str((result.run.gate_evidence or {}).get("chosen", "-"))
                sets = {"new": held_out, "old": old_domain, "validation": validation_data(champion)}
                tried = score_candidates(ModelRegistry(Settings(home=home)), result.run, champion,
                                         {name: frame for name, frame in sets.items() if frame is not None})
                outcome = Outcome(seed, name, result.run.status, new[0], new[1], new[2], old[0], old[1], old[2],
                                  result.seconds, chosen, tried)
                outcomes.append(outcome)
                added = (result.run.gate_evidence or {}).get("self_training_rows", 0)
                print(f"  {name}: {result.run.status} ({chosen}, {added} self-training rows) — new-domain "
                      f"{outcome.champion_new:.4f} -> "
                      f"{outcome.served_new:.4f}, old-domain {outcome.champion_old:.4f} -> {outcome.served_old:.4f}, "
                      f"retrain {result.seconds:.0f} s; {result.run.reason}", flush=True)

    label = f"corrections with {args.flip:.0%} of labels flipped" if args.flip else "corrections"
    print(f"\n{args.corrections} {label}; new-domain held-out rows: "
          + ", ".join(f"{name} {len(frame) - args.corrections}" for name, frame in domains.items())
          + f"; old domain: {len(old_domain)} movie reviews")
    print(f"{'seed':>4} {'domain':<9} {'decision':<9} {'chosen':<7} {'new: champion':>13} {'served':>7} "
          f"{'gain pts (95% CI)':>24} {'old: champion':>13} {'served':>7} {'change pts (95% CI)':>24} {'retrain s':>9}")
    for o in outcomes:
        print(f"{o.seed:>4} {o.domain:<9} {o.status:<9} {o.chosen:<7} {o.champion_new:>13.4f} {o.served_new:>7.4f} "
              f"{o.gain * 100:>+7.2f} [{o.new_interval[0] * 100:+6.2f}, {o.new_interval[1] * 100:+6.2f}] "
              f"{o.champion_old:>13.4f} {o.served_old:>7.4f} "
              f"{-o.loss * 100:>+7.2f} [{o.old_interval[0] * 100:+6.2f}, {o.old_interval[1] * 100:+6.2f}] "
              f"{o.retrain_seconds:>9.0f}")
    print("\nevery candidate: the gate's held-out feedback slice and golden holdout, the champion's validation rows, "
          "the benchmark's new- and old-domain sets (macro-F1)")
    print(f"{'seed':>4} {'domain':<9} {'candidate':<9} {'slice':>7} {'holdout':>7} {'valid.':>7} {'new':>7} {'old':>7}")
    for o in outcomes:
        for row in o.candidates:
            cells = " ".join(f"{row[key]:>7.4f}" if isinstance(row.get(key), float) else f"{'-':>7}"
                             for key in ("slice", "holdout", "validation", "new", "old"))
            print(f"{o.seed:>4} {o.domain:<9} {row['name']!s:<9} {cells}")
    for name in domains:
        group = [o for o in outcomes if o.domain == name]
        if args.flip:
            met = [o.served_new >= o.champion_new and o.served_old >= o.champion_old - 1e-9 for o in group]
            target = "served model no worse than the champion on either set"
        else:
            met = [o.gain >= 0.15 and o.loss <= 0.005 and o.status == "promoted" and o.retrain_seconds <= 900
                   for o in group]
            target = "+15 pts new domain, <= 0.5 pt old-domain loss, promoted, retrain <= 15 min"
        print(f"{name}: mean gain {np.mean([o.gain for o in group]) * 100:+.2f} pts, mean old-domain change "
              f"{-np.mean([o.loss for o in group]) * 100:+.2f} pts; {sum(met)} of {len(group)} seeds meet "
              f"({target}) — {'met' if all(met) else 'NOT MET'}")


if __name__ == "__main__":
    main()
