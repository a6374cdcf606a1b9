"""The training commands: ``flywheel train``, ``evaluate``, ``replay``, ``retrain now`` and ``runs``."""

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
    *,
    base: Annotated[str | None, typer.Option(help="Base model: Hugging Face id or local path.")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs over a large set (default FLYWHEEL_EPOCHS; small sets train by steps).")
    ] = None,
    warm_start: Annotated[str | None, typer.Option(help="Registry version to continue from.")] = None,
    promote: Annotated[bool, typer.Option(help="Make the new model the champion.")] = False,
    augment: Annotated[
        str | None,
        typer.Option(
            help="Augment the training split, comma-separated: synonym, insert, swap, delete, back_translation "
            "(default FLYWHEEL_AUGMENT; 'none' for none)."
        ),
    ] = None,
    augment_multiplier: Annotated[
        str | None,
        typer.Option(
            help="New rows per training row: one number for every class, or label=number pairs "
            "(default FLYWHEEL_AUGMENT_MULTIPLIER, FLYWHEEL_AUGMENT_CLASS_MULTIPLIERS)."
        ),
    ] = None,
    augment_balance: Annotated[
        bool | None,
        typer.Option(help="Top minority classes up to the largest one (default FLYWHEEL_AUGMENT_BALANCE).")
    ] = None,
    back_translation: Annotated[
        str | None,
        typer.Option(help="Two translation models, there and back, comma-separated (FLYWHEEL_BACK_TRANSLATION_MODELS).")
    ] = None,
) -> None:
    """Clean the data, fine-tune a classifier, evaluate it on the golden holdout and register it."""
    from flywheel.registry import ModelRegistry
    from retrain.data import load_dataset
    from retrain.pipeline import TrainingPipeline

    settings = load_settings()
    if epochs is not None:
        settings = settings.model_copy(update={"epochs": epochs})
    settings = _with_augmentation(settings, augment, augment_multiplier, augment_balance, back_translation)
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


def _with_augmentation(
    settings: Settings, operations: str | None, multiplier: str | None, balance: bool | None, models: str | None
) -> Settings:
    """``settings`` with the command line's augmentation options, checked by the settings' own validators."""
    from pydantic import ValidationError

    from flywheel.errors import FlywheelError, describe_validation_errors

    update: dict[str, object] = {}
    if operations is not None:
        update["augment"] = "" if operations.strip().lower() == "none" else operations
    if multiplier is not None:
        key = "augment_class_multipliers" if "=" in multiplier else "augment_multiplier"
        update[key] = multiplier
    if balance is not None:
        update["augment_balance"] = balance
    if models is not None:
        update["back_translation_models"] = models
    if not update:
        return settings
    try:
        return Settings.model_validate({**settings.model_dump(), **update})
    except ValidationError as exc:
        raise FlywheelError(f"invalid augmentation option: {describe_validation_errors(exc.errors())}") from exc


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


@app.command()
def replay(
    version: Annotated[str, typer.Argument(help="Registry version to replay the traffic with.")],
    *,
    since: Annotated[
        str, typer.Option(help="Start of the window: 90m, 24h, 7d, 2w, or an ISO timestamp (UTC unless it says).")
    ] = "24h",
    limit: Annotated[int, typer.Option(min=1, help="Most distinct texts to score, the newest first.")] = 20_000,
    served_by: Annotated[
        str | None, typer.Option(help="Only the predictions this version served (default: every version's).")
    ] = None,
    top: Annotated[int, typer.Option(min=0, help="How many disagreements and changes of label to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Score logged traffic with a candidate version: agreement, label shifts, and the texts the two disagree on."""
    from flywheel.database import Database
    from flywheel.registry import ModelRegistry
    from retrain.replay import Replay, parse_since

    settings = load_settings()
    start = parse_since(since)
    database = Database.from_settings(settings).start()
    try:
        result = Replay(database, ModelRegistry(settings)).run(
            version, start, limit=limit, served_by=served_by, top=top
        )
    finally:
        database.dispose()
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        console.print(result.render())


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
        elif candidate.get("feedback_macro_f1") is None:
            # Trained again with the held-out slice once the gate chose its recipe: it has no score on that slice.
            parts.append(f"{candidate['name']} ({'refused' if candidate.get('refused') else 'no slice score'})")
        else:
            mark = " (refused)" if candidate.get("refused") else ""
            parts.append(f"{candidate['name']} {candidate['feedback_macro_f1']:.3f}{mark}")
    return ", ".join(parts) or "-"
