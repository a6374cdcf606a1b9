"""The ``flywheel`` command line: each package's commands behind one entry point."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from flywheel.errors import FlywheelError
from flywheel.logs import configure_logging
from flywheel.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from monitoring.monitor import DriftMonitor
    from retrain.runner import RetrainRunner

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


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default FLYWHEEL_SERVE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FLYWHEEL_SERVE_PORT).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default FLYWHEEL_SERVE_WORKERS).")] = None,
) -> None:
    """Serve the champion model over HTTP with BentoML until Ctrl-C; promoted models load without a restart."""
    import importlib.util
    import os

    from flywheel.registry import ModelRegistry

    settings = _settings()
    if ModelRegistry(settings).champion() is None:
        typer.echo("warning: no champion model yet; /predict answers 503 until `flywheel train` promotes one", err=True)
    spec = importlib.util.find_spec("service.service")
    if spec is None or spec.origin is None:
        raise FlywheelError("the `service` package is not importable; run from the Flywheel checkout")
    env = dict(os.environ)
    if workers is not None:
        env["FLYWHEEL_SERVE_WORKERS"] = str(workers)
    # Each server gets BentoML's state (model store, metrics files) under the Flywheel home, not ~/bentoml.
    env.setdefault("BENTOML_HOME", str(settings.bentoml_home))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    command = [
        sys.executable, "-m", "bentoml", "serve", "service.service:TextClassifier",
        "--working-dir", str(Path(spec.origin).parent.parent),
        "--host", host or settings.serve_host,
        "--port", str(port or settings.serve_port),
    ]
    os.execve(sys.executable, command, env)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on (loopback only).")] = 9092,
) -> None:
    """Run the embedded Kafka-compatible broker (tansu) in the foreground until Ctrl-C. Dev only: in memory."""
    import signal
    import time

    from flywheel.broker import EmbeddedBroker

    _settings()

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    embedded = EmbeddedBroker(port=port).start()
    typer.echo(
        f"tansu broker on {embedded.bootstrap} with topics created. DEV ONLY: storage is in memory and everything "
        f"is lost when it stops. Point services at it with FLYWHEEL_KAFKA_BOOTSTRAP={embedded.bootstrap}; "
        "set that variable to a real Kafka instead in production. Ctrl-C stops it."
    )
    try:
        while embedded.running():
            time.sleep(0.5)
        raise FlywheelError("the tansu broker exited unexpectedly")
    except KeyboardInterrupt:
        typer.echo("stopping broker")
    finally:
        embedded.stop()


feedback_app = typer.Typer(help="The feedback store: annotations in, labels out, statistics, review.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@app.command()
def ingest(
    group: Annotated[str | None, typer.Option(help="Consumer group (default FLYWHEEL_INGEST_GROUP_ID).")] = None,
) -> None:
    """Consume flywheel.predictions into the feedback store until Ctrl-C or SIGTERM."""
    import signal

    from feedback.ingestion import PredictionIngestor
    from feedback.store import open_store

    store = open_store(_settings())
    ingestor = PredictionIngestor(store.settings, store, group_id=group)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: ingestor.stop())
    try:
        stats = ingestor.run()
    finally:
        store.database.dispose()
    typer.echo(
        f"ingest stopped: {stats.inserted} new predictions, {stats.duplicates} duplicates, "
        f"{stats.dead_lettered} dead-lettered, {stats.joined} feedback joined"
    )


@feedback_app.command("import")
def feedback_import(
    file: Annotated[Path, typer.Argument(help="CSV or JSONL with text and label columns.")],
    source: Annotated[str, typer.Option(help="Who labeled the file (see FLYWHEEL_FEEDBACK_TRUSTED_SOURCES).")] = (
        "annotation"
    ),
) -> None:
    """Import labeled texts from an annotation team; importing the same file again changes nothing."""
    from feedback.annotations import read_annotations
    from feedback.models import check_source
    from feedback.store import feedback_event, open_store
    from flywheel.publisher import EventPublisher
    from flywheel.registry import ModelRegistry

    settings = _settings()
    check_source(source)
    champion = ModelRegistry(settings).champion()
    labels = ModelRegistry(settings).get(champion).card.labels if champion else None
    annotations = read_annotations(file, settings.text_column, settings.label_column, labels, settings.max_text_chars)
    if annotations.problems:
        typer.echo(f"skipped {len(annotations.problems)} rows: {annotations.summary()}", err=True)
    if not annotations.rows:
        raise FlywheelError(f"{file} has no usable rows")
    store = open_store(settings)
    with EventPublisher(settings, name="import") as publisher:
        result = store.import_labels(
            annotations.rows, source, on_saved=lambda saved: publisher.publish(feedback_event(saved))
        )
    store.database.dispose()
    typer.echo(f"imported {file.name} as {source!r}: {result.created} new, {result.updated} updated, "
               f"{result.unchanged} unchanged")


@feedback_app.command("export")
def feedback_export(
    output: Annotated[Path | None, typer.Option(help="CSV file to write (default: standard output).")] = None,
    status: Annotated[str | None, typer.Option(help="Only pending, accepted, rejected or used feedback.")] = None,
) -> None:
    """Write all feedback as CSV: text, label, source, status, then reasons, ids and vetting scores."""
    from feedback.annotations import write_export
    from feedback.models import FeedbackStatus
    from feedback.store import open_store

    if status is not None and status not in set(FeedbackStatus):
        raise FlywheelError(f"unknown status {status!r}: use one of {', '.join(FeedbackStatus)}")
    store = open_store(_settings())
    rows = store.export(FeedbackStatus(status) if status else None)
    try:
        if output is None:
            write_export(rows, sys.stdout)
        else:
            with output.open("w", encoding="utf-8", newline="") as handle:
                count = write_export(rows, handle)
            typer.echo(f"wrote {count} rows to {output}", err=True)
    finally:
        store.database.dispose()


@feedback_app.command("stats")
def feedback_stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Counts by status, label and source; label-error flags, conflicts, quarantines, model agreement."""
    from feedback.stats import feedback_stats as compute
    from feedback.store import open_store

    store = open_store(_settings())
    stats = compute(store.database, store.vetter)
    store.database.dispose()
    if as_json:
        typer.echo(stats.model_dump_json(indent=2))
    else:
        console.print(stats.render())


@feedback_app.command("review")
def feedback_review(
    limit: Annotated[int, typer.Option(help="How many to show.")] = 50,
) -> None:
    """Labels waiting for a reviewer (possible label errors, conflicts, quarantined sources), oldest first."""
    from feedback.store import open_store

    store = open_store(_settings())
    table = Table("feedback_id", "source", "label", "model", "text", "why")
    for row in store.pending(limit):
        model = f"{row.model_label} {row.model_confidence:.2f}" if row.model_label and row.model_confidence else "-"
        table.add_row(row.feedback_id, row.source, row.label, model, (row.text or "-")[:60], row.status_reason or "")
    store.database.dispose()
    console.print(table)


@feedback_app.command("resolve")
def feedback_resolve(
    feedback_id: str,
    accept: Annotated[bool, typer.Option("--accept/--reject", help="Accept or reject the label.")],
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "reviewed",
) -> None:
    """Record a reviewer's verdict on one label."""
    from feedback.store import open_store

    store = open_store(_settings())
    row = store.resolve(feedback_id, accept, reason)
    store.database.dispose()
    typer.echo(f"{row.feedback_id}: {row.status.value}")


@feedback_app.command("vet")
def feedback_vet(
    batch: Annotated[int, typer.Option(help="Texts scored per model call.")] = 256,
) -> None:
    """Score labels of new texts that no model has judged yet with the champion, then vet them."""
    from feedback.store import open_store
    from flywheel.classifier import Classifier
    from flywheel.registry import ModelRegistry

    settings = _settings()
    entry = ModelRegistry(settings).champion_version()
    classifier = Classifier.load(entry.model_dir, max_length=entry.card.max_length, version=entry.version)
    store = open_store(settings)
    total = 0
    while waiting := store.awaiting_evidence(batch):
        probs = classifier.predict_proba([text for _, text in waiting]).probs
        scores = {
            feedback_id: {label: float(p) for label, p in zip(classifier.labels, row, strict=True)}
            for (feedback_id, _), row in zip(waiting, probs, strict=True)
        }
        total += store.attach_evidence(entry.version, scores)
    store.database.dispose()
    typer.echo(f"vetted {total} labels against model {entry.version}")


@feedback_app.command("source")
def feedback_source(
    name: str,
    trust: Annotated[bool | None, typer.Option("--trust/--distrust", help="Accept its labels without vetting.")] = None,
    release: Annotated[bool, typer.Option(help="Lift its quarantine.")] = False,
) -> None:
    """Show a feedback source; trust or distrust it, or release it from quarantine."""
    from feedback.store import open_store

    store = open_store(_settings())
    source = store.set_source(name, trusted=trust, quarantined=False if release else None)
    store.database.dispose()
    typer.echo(source.model_dump_json(indent=2))


retrain_app = typer.Typer(help="Retrain the champion from accepted feedback.", no_args_is_help=True)
app.add_typer(retrain_app, name="retrain")


def _retrain_runner(settings: Settings) -> RetrainRunner:
    from feedback.store import open_store
    from flywheel.registry import ModelRegistry
    from retrain.runner import RetrainRunner

    store = open_store(settings)
    return RetrainRunner(settings, store.database, store, ModelRegistry(settings))


@retrain_app.command("now")
def retrain_now(
    from_base: Annotated[bool, typer.Option(help="Fine-tune from the base model, not the champion.")] = False,
) -> None:
    """Run one retrain in this process: train a challenger, gate it, promote it if it is better."""
    import signal

    from retrain.models import RunTrigger

    settings = _settings()
    if from_base:
        settings = settings.model_copy(update={"retrain_from_base": True})
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
    table = Table("run", "started", "trigger", "status", "feedback train/eval", "champion", "challenger", "reason")
    for run in _retrain_runner(_settings()).runs(limit):
        table.add_row(
            run.run_id,
            run.started_at.strftime("%Y-%m-%d %H:%M:%S") if run.started_at else "-",
            run.trigger,
            run.status,
            f"{run.feedback_train_rows}/{run.feedback_eval_rows}",
            run.champion_version or "-",
            run.challenger_version or "-",
            run.reason or "",
        )
    console.print(table)


@app.command()
def worker() -> None:
    """The retrain worker: scheduled checks, queued and drift-triggered retrains, housekeeping; stops on SIGTERM."""
    from retrain.worker import RetrainWorker

    RetrainWorker(_settings()).run_forever()


@app.command()
def up(
    port: Annotated[int, typer.Option(help="HTTP port of the service (bound to 127.0.0.1).")] = 3000,
    broker_port: Annotated[
        int, typer.Option(help="Port of the embedded broker; unused when FLYWHEEL_KAFKA_BOOTSTRAP is set.")
    ] = 9092,
    data: Annotated[Path | None, typer.Option(help="Labeled file for the first model (default: the seed set).")] = None,
    train_minutes: Annotated[float, typer.Option(help="Wall-time cap of the first training run.")] = 5.0,
) -> None:
    """The whole loop on this machine: broker, first model, service, ingestion, worker; Ctrl-C stops it all."""
    from flywheel.stack import LocalStack

    LocalStack(_settings(), port=port, broker_port=broker_port, data=data, train_minutes=train_minutes).run()


drift_app = typer.Typer(help="Drift reports: recent traffic against the training data.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")


def _drift_monitor(settings: Settings, alert: bool) -> tuple[DriftMonitor, Callable[[], None]]:
    from feedback.database import Database
    from flywheel.publisher import EventPublisher
    from monitoring.monitor import DriftMonitor

    database = Database.from_settings(settings).start()
    publisher = EventPublisher(settings, name="drift").start() if alert else None

    def close() -> None:
        if publisher is not None:
            publisher.close()
        database.dispose()

    return DriftMonitor(settings, database=database, publisher=publisher), close


@drift_app.command("run")
def drift_run(
    hours: Annotated[float | None, typer.Option(help="Window length (default FLYWHEEL_DRIFT_WINDOW_HOURS).")] = None,
    max_rows: Annotated[
        int | None, typer.Option(help="Newest predictions kept (default FLYWHEEL_DRIFT_WINDOW_MAX_ROWS).")
    ] = None,
    alert: Annotated[bool, typer.Option(help="Publish a drifted verdict on flywheel.alerts.")] = True,
) -> None:
    """Compare the recent predictions with the champion's training data; store the report and print the verdict."""
    settings = _settings()
    overrides = {"drift_window_hours": hours, "drift_window_max_rows": max_rows}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    monitor, close = _drift_monitor(settings, alert)
    try:
        summary = monitor.run()
    finally:
        close()
    typer.echo(
        f"drift report {summary.report_id}: {summary.verdict} — {summary.message}; model {summary.model_version}, "
        f"{summary.current_rows} current vs {summary.reference_rows} reference rows, {summary.duration_seconds:.1f}s"
    )
    typer.echo(f"report: {monitor.archive.path(summary.report_id) / 'report.html'}")


@drift_app.command("watch")
def drift_watch() -> None:
    """Run a drift report now and every FLYWHEEL_DRIFT_INTERVAL_SECONDS until Ctrl-C or SIGTERM."""
    from monitoring.schedule import watch

    settings = _settings()
    if settings.drift_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.drift_metrics_port)
    monitor, close = _drift_monitor(settings, alert=True)
    try:
        watch(monitor, settings)
    finally:
        close()


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
