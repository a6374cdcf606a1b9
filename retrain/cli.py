"""The training commands: ``flywheel train``, ``evaluate``, ``retrain now`` and ``runs``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flywheel.cli import console, load_settings
from flywheel.settings import Settings

if TYPE_CHECKING:
    from flywheel.models.retrain import RetrainRunPublic
    from retrain.runner import RetrainRunner

app = typer.Typer()
retrain_app = typer.Typer(help="Retrain the champion from accepted feedback.", no_args_is_help=True)
app.add_typer(retrain_app, name="retrain")


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Labeled CSV, JSONL or Parquet file.")],
    base: Annotated[str | None, typer.Option(help="Base model: Hugging Face id or local path.")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs over a large set (default FLYWHEEL_EPOCHS; small sets train by steps).")
    ] = None,
    warm_start: Annotated[str | None, typer.Option(help="Registry version to continue from.")] = None,
    promote: Annotated[bool, typer.Option(help="Make the new model the champion.")] = False,
) -> None:
    """Clean the data, fine-tune a classifier, evaluate it on the golden holdout and register it."""
    from flywheel.registry import ModelRegistry
    from retrain.data import load_dataset
    from retrain.pipeline import TrainingPipeline

    settings = load_settings()
    if epochs is not None:
        settings = settings.model_copy(update={"epochs": epochs})
    raw = load_dataset(data, settings.text_column, settings.label_column)
    outcome = TrainingPipeline(settings, ModelRegistry(settings)).run(
        raw, base=base, warm_start=warm_start, promote=promote
    )
    console.print(outcome.quality.render())
    console.print(outcome.holdout_metrics.table(f"golden holdout ({outcome.holdout.sha256[:12]})"))
    t = outcome.training
    console.print(
        f"model {outcome.version.version}: {t.steps_run} steps in {t.epochs_run} epochs ({t.stopped_because}), "
        f"{t.seconds:.1f}s, {t.samples_per_second:.1f} samples/s"
        + (f", linear probe alone {t.probe_macro_f1:.4f} validation macro-F1" if t.probe_macro_f1 is not None else "")
        + (" — now champion" if outcome.promoted else "")
    )


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Labeled CSV, JSONL or Parquet file.")],
    model: Annotated[str | None, typer.Option(help="Registry version (default: the champion).")] = None,
) -> None:
    """Score a registered model on a labeled file."""
    from flywheel.classifier import Classifier
    from flywheel.registry import ModelRegistry
    from retrain.data import load_dataset
    from retrain.evaluation import evaluate as run_evaluation
    from retrain.quality import QualityPipeline

    settings = load_settings()
    registry = ModelRegistry(settings)
    entry = registry.get(model) if model else registry.champion_version()
    raw = load_dataset(data, settings.text_column, settings.label_column)
    cleaned, report = QualityPipeline(settings.max_text_chars, allowed_labels=entry.card.labels, min_labels=1).run(raw)
    console.print(report.render())
    classifier = Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=entry.version)
    metrics = run_evaluation(classifier, cleaned)
    console.print(metrics.table(f"{entry.version} on {data.name}"))


def _retrain_runner(settings: Settings) -> RetrainRunner:
    from flywheel.database import Database
    from flywheel.registry import ModelRegistry
    from retrain.runner import RetrainRunner

    return RetrainRunner(settings, Database.from_settings(settings).start(), ModelRegistry(settings))


@retrain_app.command("now")
def retrain_now(
    candidate: Annotated[
        list[str] | None,
        typer.Option(help="Challenger recipe to train (repeatable; default FLYWHEEL_RETRAIN_CANDIDATES).")
    ] = None,
) -> None:
    """Run one retrain in this process: train a challenger, gate it, promote it if it is better."""
    import signal

    from flywheel.models.retrain import RunTrigger

    settings = load_settings()
    if candidate:
        from retrain.candidates import GRID

        unknown = sorted(set(candidate) - set(GRID))
        if unknown:
            raise typer.BadParameter(f"unknown recipe {', '.join(unknown)}; choose from {', '.join(GRID)}")
        settings = settings.model_copy(update={"retrain_candidates": candidate})
    # SIGTERM ends the run like Ctrl-C does, so it is recorded as failed instead of left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run = _retrain_runner(settings).run(RunTrigger.MANUAL)
    if run is None:
        typer.echo("error: another worker is retraining right now; try again when it finishes", err=True)
        sys.exit(3)
    typer.echo(f"run {run.run_id}: {run.status} — {run.reason}")
    if run.challenger_version:
        typer.echo(f"champion {run.champion_version}, challenger {run.challenger_version}")


@app.command()
def runs(limit: Annotated[int, typer.Option(help="How many runs to show.")] = 20) -> None:
    """Retrain history, newest first: trigger, data counts, both models' scores, decision."""
    table = Table(
        "run", "started", "trigger", "status", "feedback train/eval", "champion", "challenger", "candidates", "reason"
    )
    for run in _retrain_runner(load_settings()).runs(limit):
        table.add_row(
            run.run_id,
            run.started_at.strftime("%Y-%m-%d %H:%M:%S") if run.started_at else "-",
            run.trigger,
            run.status,
            f"{run.feedback_train_rows}/{run.feedback_eval_rows}",
            run.champion_version or "-",
            run.challenger_version or "-",
            _candidates(run),
            run.reason or "",
        )
    console.print(table)


def _candidates(run: RetrainRunPublic) -> str:
    """Each candidate's held-out feedback macro-F1, refused ones marked, skipped ones named."""
    parts = []
    for candidate in run.candidates or []:
        if "skipped" in candidate:
            parts.append(f"{candidate['name']} skipped")
        else:
            mark = " (refused)" if candidate.get("refused") else ""
            parts.append(f"{candidate['name']} {candidate['feedback_macro_f1']:.3f}{mark}")
    return ", ".join(parts) or "-"
