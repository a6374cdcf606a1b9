"""The ``flywheel`` command line: each package's commands behind one entry point."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.errors import FlywheelError
from flywheel.logs import configure_logging
from flywheel.settings import Settings

app = typer.Typer(help="Flywheel: serve a text classifier and improve it from feedback.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect the model registry and move the champion pointer.", no_args_is_help=True)
app.add_typer(models_app, name="models")
# Piped output is not cut to 80 columns: version ids and tables must stay whole for scripts.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def _settings() -> Settings:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    return settings


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Labeled CSV, JSONL or Parquet file.")],
    base: Annotated[str | None, typer.Option(help="Base model: Hugging Face id or local path.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs (default FLYWHEEL_EPOCHS).")] = None,
    warm_start: Annotated[str | None, typer.Option(help="Registry version to continue from.")] = None,
    promote: Annotated[bool, typer.Option(help="Make the new model the champion.")] = False,
) -> None:
    """Clean the data, fine-tune a classifier, evaluate it on the golden holdout and register it."""
    from flywheel.registry import ModelRegistry
    from retrain.data import load_dataset
    from retrain.pipeline import TrainingPipeline

    settings = _settings()
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
        f"model {outcome.version.version}: {t.epochs_run} epochs ({t.stopped_because}), "
        f"{t.seconds:.1f}s, {t.samples_per_second:.1f} samples/s"
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

    settings = _settings()
    registry = ModelRegistry(settings)
    entry = registry.get(model) if model else registry.champion_version()
    raw = load_dataset(data, settings.text_column, settings.label_column)
    cleaned, report = QualityPipeline(settings.max_text_chars, allowed_labels=entry.card.labels, min_labels=1).run(raw)
    console.print(report.render())
    classifier = Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=entry.version)
    metrics = run_evaluation(classifier, cleaned)
    console.print(metrics.table(f"{entry.version} on {data.name}"))


@models_app.command("list")
def models_list() -> None:
    """All registered versions, oldest first; the champion is marked."""
    from flywheel.registry import ModelRegistry

    registry = ModelRegistry(_settings())
    champion = registry.champion()
    table = Table("version", "created", "parent", "holdout macro-F1", "train rows", "champion")
    for entry in registry.list():
        card = entry.card
        table.add_row(
            entry.version,
            card.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            card.parent_version or "-",
            f"{card.holdout_metrics['macro_f1']:.4f}",
            str(card.train_rows),
            "*" if entry.version == champion else "",
        )
    console.print(table)


@models_app.command("show")
def models_show(version: str) -> None:
    """The model card of one version, as JSON."""
    from flywheel.registry import ModelRegistry

    entry = ModelRegistry(_settings()).get(version)
    typer.echo(entry.card.model_dump_json(indent=2))


@models_app.command("promote")
def models_promote(version: str) -> None:
    """Make VERSION the champion; serving processes pick it up without a restart."""
    from flywheel.registry import ModelRegistry

    change = ModelRegistry(_settings()).promote(version, reason="manual promote")
    typer.echo(f"champion: {change.previous or '-'} -> {change.version}")


@models_app.command("rollback")
def models_rollback() -> None:
    """Restore the previous champion."""
    from flywheel.registry import ModelRegistry

    change = ModelRegistry(_settings()).rollback()
    typer.echo(f"champion: {change.previous} -> {change.version}")


def main() -> None:
    """Console-script entry: run the app, turning user-fixable errors into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except FlywheelError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
