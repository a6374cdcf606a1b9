"""Feedback commands: `flywheel ingest`, `flywheel feedback import|export|stats|review|resolve|confirm|vet`,
`flywheel sources list|trust|distrust|quarantine|release`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flywheel.cli import console, load_settings
from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from feedback.store import FeedbackStore
    from flywheel.models.feedback import FeedbackPublic, FeedbackSourcePublic
    from flywheel.settings import Settings

app = typer.Typer()
feedback_app = typer.Typer(help="The feedback store: annotations in, labels out, statistics, review.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")
sources_app = typer.Typer(help="Feedback sources (the principals that send labels): trust and quarantine.",
                          no_args_is_help=True)
app.add_typer(sources_app, name="sources")
labels_app = typer.Typer(help="The labels feedback may use beyond the champion's.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")
#: ``--as NAME``: who makes a change, for the audit log.
Actor = Annotated[str, typer.Option("--as", help="Who makes this change, for the audit log.")]


@contextmanager
def _store() -> Iterator[FeedbackStore]:
    from feedback.store import open_store

    store = open_store(load_settings())
    try:
        yield store
    finally:
        store.database.dispose()


@app.command()
def ingest(
    group: Annotated[str | None, typer.Option(help="Consumer group (default FLYWHEEL_INGEST_GROUP_ID).")] = None,
) -> None:
    """Consume flywheel.predictions into the feedback store until Ctrl-C or SIGTERM."""
    import signal

    from feedback.ingestion import PredictionIngestor
    from feedback.store import open_store

    store = open_store(load_settings())
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


#: ``--format`` of `feedback import` and `feedback export`: the team's rows, or Label Studio's JSON tasks.
ROWS, LABEL_STUDIO = "rows", "label-studio"
Format = Annotated[str, typer.Option("--format", help="rows (CSV; JSONL too on import) or label-studio (JSON tasks).")]


def _allowed_labels(settings: Settings, store: FeedbackStore) -> list[str] | None:
    """The champion's labels and the ones an admin added, as POST /feedback allows; None without a champion."""
    from flywheel.label_set import LabelSet
    from flywheel.registry import ModelRegistry

    registry = ModelRegistry(settings)
    champion = registry.champion()
    return [*registry.get(champion).card.labels, *LabelSet(store.database).added_names()] if champion else None


@feedback_app.command("import")
def feedback_import(
    file: Annotated[Path, typer.Argument(help="CSV or JSONL with text and label columns, or a Label Studio export.")],
    source: Annotated[
        str, typer.Option(help="Who labeled the file: its labels are vetted unless `flywheel sources trust` it.")
    ] = "annotation",
    file_format: Format = ROWS,
) -> None:
    """Import labeled texts from an annotation team (of a Label Studio export: each task's newest annotation, for
    the prediction the task came from when the store has it); importing the same file again changes nothing."""
    from feedback.annotations import read_annotations
    from feedback.label_studio import import_tasks, read_export
    from feedback.store import feedback_event, open_store
    from flywheel.models.feedback import check_source
    from flywheel.publisher import EventPublisher

    settings = load_settings()
    check_source(source)
    if file_format not in (ROWS, LABEL_STUDIO):
        raise FlywheelError(f"unknown format {file_format!r}: use {ROWS} or {LABEL_STUDIO}")
    if file_format == ROWS:
        annotations = read_annotations(file, settings.text_column, settings.label_column, None, settings.max_text_chars)
    store = open_store(settings)
    allowed = _allowed_labels(settings, store)
    if file_format == LABEL_STUDIO:
        tasks = read_export(file, allowed, settings.max_text_chars)
        problems, summary, usable = tasks.problems, tasks.summary(), bool(tasks.items)
    else:
        if allowed is not None:
            annotations.keep_labels(allowed)
        problems, summary, usable = annotations.problems, annotations.summary(), bool(annotations.rows)
    if problems:
        typer.echo(f"skipped {len(problems)} rows: {summary}", err=True)
    if not usable:
        store.database.dispose()
        raise FlywheelError(f"{file} has no usable rows")
    with EventPublisher(settings, name="import") as publisher:

        def on_saved(saved: FeedbackPublic) -> None:
            publisher.publish(feedback_event(saved))

        result = (
            import_tasks(store, tasks, source, on_saved=on_saved)
            if file_format == LABEL_STUDIO
            else store.import_labels(annotations.rows, source, on_saved=on_saved)
        )
    store.database.dispose()
    kept = f", {result.used} kept (already used for training)" if result.used else ""
    typer.echo(f"imported {file.name} as {source!r}: {result.created} new, {result.updated} updated, "
               f"{result.unchanged} unchanged{kept}")


@feedback_app.command("export")
def feedback_export(
    output: Annotated[Path | None, typer.Option(help="File to write (default: standard output).")] = None,
    status: Annotated[str | None, typer.Option(help="Only pending, accepted, rejected or used feedback.")] = None,
    file_format: Format = ROWS,
    queue: Annotated[int | None, typer.Option(help="Export N review-queue items instead (label-studio).")] = None,
    label_config: Annotated[Path | None, typer.Option(help="Write the labelling config (label-studio).")] = None,
) -> None:
    """Write all feedback as CSV (text, label, source, status, then reasons, ids and vetting scores), or as Label
    Studio tasks: labels as annotations, or with ``--queue N`` the review queue with the model's guesses."""
    from feedback.annotations import write_export
    from feedback.label_studio import label_config as config_of
    from feedback.label_studio import write_tasks
    from feedback.store import open_store
    from flywheel.models.feedback import FeedbackStatus

    if status is not None and status not in set(FeedbackStatus):
        raise FlywheelError(f"unknown status {status!r}: use one of {', '.join(FeedbackStatus)}")
    if file_format != LABEL_STUDIO and (file_format != ROWS or queue is not None or label_config is not None):
        raise FlywheelError(f"use --format {ROWS} or {LABEL_STUDIO}; --queue and --label-config need {LABEL_STUDIO}")
    settings = load_settings()
    store = open_store(settings)
    rows = store.export(FeedbackStatus(status) if status else None)
    try:
        if label_config is not None:
            label_config.write_text(config_of(_allowed_labels(settings, store) or []), encoding="utf-8")
        with contextlib.ExitStack() as stack:
            out = sys.stdout if output is None else stack.enter_context(output.open("w", encoding="utf-8", newline=""))
            count = write_tasks(store, rows, queue, out) if file_format == LABEL_STUDIO else write_export(rows, out)
        if output is not None:
            typer.echo(f"wrote {count} {'tasks' if file_format == LABEL_STUDIO else 'rows'} to {output}", err=True)
    finally:
        store.database.dispose()


@feedback_app.command("stats")
def feedback_stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Counts by status, label and source; label-error flags, conflicts, quarantines, model agreement."""
    from feedback.stats import feedback_stats as compute
    from feedback.store import open_store

    store = open_store(load_settings())
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

    store = open_store(load_settings())
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
    actor: Actor = "cli",
) -> None:
    """Record a reviewer's verdict on one label (audited); an accepted label counts as confirmed."""
    with _store() as store:
        row = store.resolve(feedback_id, accept, reason, reviewer=actor)
    typer.echo(f"{row.feedback_id}: {row.status.value}")


@feedback_app.command("confirm")
def feedback_confirm(feedback_id: str, actor: Actor = "cli") -> None:
    """Vouch for a held or untrusted label: it is accepted and counts as trusted (audited)."""
    with _store() as store:
        row = store.confirm(feedback_id, reviewer=actor)
    typer.echo(f"{row.feedback_id}: {row.status.value}, confirmed by {row.confirmed_by}")


@feedback_app.command("vet")
def feedback_vet(
    batch: Annotated[int, typer.Option(help="Texts scored per model call.")] = 256,
) -> None:
    """Score labels of new texts that no model has judged yet with the champion, then vet them."""
    from feedback.store import open_store
    from flywheel.registry import ModelRegistry
    from flywheel.runtime import load_classifier

    settings = load_settings()
    entry = ModelRegistry(settings).champion_version()
    # The runtime the service serves in, so that the scores are the ones its predictions carry.
    classifier = load_classifier(entry, settings)
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


def _describe(source: FeedbackSourcePublic) -> str:
    quarantine = f"quarantined ({source.quarantine_reason})" if source.quarantined else "not quarantined"
    return (
        f"{source.source}: {'trusted' if source.trusted else 'not trusted'}, {quarantine}, "
        f"reliability {source.reliability:.2f} ({source.label_issues} possible label errors in {source.scored} scored)"
    )


@sources_app.command("list")
def sources_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Every source with its trust, quarantine and reliability."""
    import json

    with _store() as store:
        sources = store.sources()
    if as_json:
        typer.echo(json.dumps([source.model_dump(mode="json") for source in sources], indent=2))
        return
    table = Table("source", "trusted", "quarantined", "reliability", "scored", "label issues")
    for source in sources:
        quarantined = (source.quarantine_reason or "yes") if source.quarantined else ""
        table.add_row(source.source, "yes" if source.trusted else "", quarantined, f"{source.reliability:.2f}",
                      str(source.scored), str(source.label_issues))
    console.print(table)


@sources_app.command("trust")
def sources_trust(name: str, actor: Actor = "cli") -> None:
    """Accept NAME's labels without the evidence checks, its open labels included (audited)."""
    with _store() as store:
        typer.echo(_describe(store.set_source(name, trusted=True, actor=actor)))


@sources_app.command("distrust")
def sources_distrust(name: str, actor: Actor = "cli") -> None:
    """Vet NAME's labels again, its open labels included (audited)."""
    with _store() as store:
        typer.echo(_describe(store.set_source(name, trusted=False, actor=actor)))


@sources_app.command("quarantine")
def sources_quarantine(
    name: str,
    reason: Annotated[str, typer.Option(help="Why, for the record and the held labels.")],
    actor: Actor = "cli",
) -> None:
    """Hold NAME's new and accepted, unused labels for review (audited)."""
    with _store() as store:
        typer.echo(_describe(store.set_source(name, quarantined=True, reason=reason, actor=actor)))


@sources_app.command("release")
def sources_release(name: str, actor: Actor = "cli") -> None:
    """Lift NAME's quarantine (audited); its held labels wait for a reviewer."""
    with _store() as store:
        typer.echo(_describe(store.set_source(name, quarantined=False, actor=actor)))


@app.command()
def forget(
    client_id: Annotated[str, typer.Option("--client-id", help="The X-Client-Id whose data is removed.")],
    actor: Actor = "cli",
) -> None:
    """Remove a client's predictions, the feedback on them and its spilled events; the audit log records it."""
    from feedback.retention import forget_client

    with _store() as store:
        gone = forget_client(store.database, store.settings.home, client_id, actor)
    typer.echo(
        f"forgot client {client_id!r}: {gone.predictions} predictions, {gone.feedback} feedback rows, "
        f"{gone.spilled_events} spilled events"
    )
    if gone.held_spill_files:
        typer.echo(
            f"{gone.held_spill_files} spill files belong to running processes and were not searched: their events "
            "reach the store once delivered; run this again after they are replayed",
            err=True,
        )


@labels_app.command("add")
def labels_add(
    name: Annotated[str, typer.Argument(help="The new label, exactly as feedback will send it.")],
    note: Annotated[str | None, typer.Option(help="Why it is added, for the record.")] = None,
    actor: Actor = "cli",
) -> None:
    """Allow feedback with NAME although the champion lacks it; the next retrain with rows of it grows the head."""
    from flywheel.label_set import LabelSet
    from flywheel.models.labels import LabelCreate

    with _store() as store:
        label, new = LabelSet(store.database).add(LabelCreate(name=name, note=note), added_by=actor)
    if new:
        typer.echo(f"label {label.name!r} allowed: feedback with it is stored, and the next retrain learns it")
    else:
        typer.echo(f"label {label.name!r} was already allowed (by {label.added_by}, {label.created_at:%Y-%m-%d})")


@labels_app.command("list")
def labels_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The champion's labels, the added ones, and how often feedback named a label nobody allowed."""
    import json

    from flywheel.label_set import LabelSet
    from flywheel.registry import ModelRegistry

    settings = load_settings()
    registry = ModelRegistry(settings)
    champion = registry.champion()
    model_labels = registry.get(champion).card.labels if champion else []
    with _store() as store:
        labels = LabelSet(store.database)
        added, refused = labels.added(), labels.refusals()
    if as_json:
        typer.echo(json.dumps({
            "champion": model_labels,
            "added": [label.model_dump(mode="json") for label in added],
            "refused": refused,
        }, indent=2))
        return
    table = Table("label", "where", "note", title="labels")
    for name in model_labels:
        table.add_row(name, f"champion {champion}", "")
    for label in added:
        where = "added; the champion has it" if label.name in model_labels else "added; the next retrain learns it"
        table.add_row(label.name, f"{where} (by {label.added_by})", label.note or "")
    console.print(table)
    if refused:
        counts = Table("label", "refused feedback", title="refused: labels nobody allowed")
        for name, count in sorted(refused.items(), key=lambda item: -item[1]):
            counts.add_row(name, str(count))
        console.print(counts)
