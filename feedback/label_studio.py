"""Label Studio's JSON task format: the review queue and stored labels out as tasks, annotations back in as feedback.

A task is ``{"data": {"text": ...}, "meta": {"prediction_id": ...}, "predictions": [...], "annotations": [...]}``;
a prediction or an annotation holds a ``result`` list whose text-classification entries are
``{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [LABEL]}}``. ``label_config``
writes the labelling configuration those names belong to (a ``Text`` named ``text`` and single ``Choices`` named
``label``), so Label Studio shows the model's guess as a pre-annotation. An exported project (Label Studio's
"JSON" export: a list of tasks with their annotations) comes back through ``read_tasks`` and ``import_tasks``: each
task's newest annotation that was not cancelled becomes a label of the importing principal, of the prediction named
in ``meta`` when this store has it, else of the text, stored as ``POST /feedback`` stores labels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from xml.sax.saxutils import quoteattr

from sqlmodel import col, select

from feedback.annotations import SHOWN_PROBLEMS, AnnotationFileError
from feedback.decisions import FeedbackConflictError
from feedback.review import ReviewItem, ReviewQueue
from feedback.store import FeedbackStore, ImportResult
from flywheel.events import new_id
from flywheel.label_set import UnknownLabelError
from flywheel.models.feedback import Feedback, FeedbackCreate, FeedbackPublic, Prediction

#: Names of the labelling configuration's tags that results refer to.
TEXT_NAME = "text"
CHOICES_NAME = "label"
#: Labels stored per transaction on import.
CHUNK = 500


def label_config(labels: Iterable[str]) -> str:
    """A Label Studio labelling configuration for one text and a single choice among ``labels``."""
    choices = "".join(f"    <Choice value={quoteattr(label)}/>\n" for label in labels)
    return (
        "<View>\n"
        f'  <Text name="{TEXT_NAME}" value="${TEXT_NAME}"/>\n'
        f'  <Choices name="{CHOICES_NAME}" toName="{TEXT_NAME}" choice="single" showInLine="true">\n'
        f"{choices}"
        "  </Choices>\n"
        "</View>\n"
    )


def _choice(label: str) -> dict[str, Any]:
    return {
        "id": new_id()[-10:],
        "from_name": CHOICES_NAME,
        "to_name": TEXT_NAME,
        "type": "choices",
        "value": {"choices": [label]},
    }


def queue_tasks(items: Iterable[ReviewItem]) -> list[dict[str, Any]]:
    """Review-queue items as tasks to label, the model's guess as a prediction with its confidence as score."""
    return [
        {
            "data": {TEXT_NAME: item.text},
            "meta": {
                "prediction_id": item.prediction_id,
                "model_version": item.model_version,
                "drift_score": item.drift_score,
                "similar": item.similar,
            },
            "predictions": [
                {"model_version": item.model_version, "score": item.confidence, "result": [_choice(item.label)]}
            ],
        }
        for item in items
    ]


def label_tasks(rows: Iterable[FeedbackPublic]) -> list[dict[str, Any]]:
    """Stored labels as annotated tasks (labels still waiting for their prediction's text are left out)."""
    tasks = []
    for row in rows:
        if row.text is None:
            continue
        task: dict[str, Any] = {
            "data": {TEXT_NAME: row.text},
            "meta": {
                "prediction_id": row.prediction_id,
                "feedback_id": row.feedback_id,
                "source": row.source,
                "status": row.status.value,
            },
            "annotations": [{"result": [_choice(row.label)], "was_cancelled": False, "ground_truth": False}],
        }
        if row.model_label is not None:
            task["predictions"] = [
                {
                    "model_version": row.model_version,
                    "score": row.model_confidence,
                    "result": [_choice(row.model_label)],
                }
            ]
        tasks.append(task)
    return tasks


@dataclass(frozen=True)
class TaskLabel:
    """The label an annotator chose for one task's text, and the prediction the task was exported from."""

    text: str
    label: str
    prediction_id: str | None = None


@dataclass
class LabelStudioTasks:
    """The labels found in exported tasks, and what was wrong with the rest."""

    items: list[TaskLabel] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Tasks nobody annotated (or whose annotations were all cancelled): nothing to import, nothing wrong.
    unannotated: int = 0

    def summary(self) -> str:
        """The problems, a few in full."""
        more = len(self.problems) - SHOWN_PROBLEMS
        return "; ".join(self.problems[:SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


class LabelStudioImport(ImportResult):
    """What importing exported tasks did."""

    #: Labels the model lacks and no admin added, refused as ``POST /feedback`` refuses them.
    refused: int = 0


def _chosen(task: dict[str, Any]) -> list[str] | None:
    """The choices of the task's newest annotation that was not cancelled; None when there is none."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    for annotation in reversed(annotations):
        results = [r for r in annotation.get("result") or [] if isinstance(r, dict) and r.get("type") == "choices"]
        ours = [r for r in results if r.get("from_name") == CHOICES_NAME] or results
        if ours:
            choices = (ours[0].get("value") or {}).get("choices")
            return [c for c in choices if isinstance(c, str)] if isinstance(choices, list) else []
    return None


def read_tasks(data: Any, labels: Collection[str] | None, max_chars: int) -> LabelStudioTasks:
    """The labels in a Label Studio JSON export (a list of tasks, or one task); ``labels`` None allows any."""
    tasks = data if isinstance(data, list) else [data]
    found = LabelStudioTasks()
    for number, task in enumerate(tasks, start=1):
        where = f"task {number}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            found.problems.append(f"{where}: not a Label Studio task (an object with a data object)")
            continue
        chosen = _chosen(task)
        if chosen is None:
            found.unannotated += 1
            continue
        text, meta = task["data"].get(TEXT_NAME), task.get("meta")
        prediction_id = meta.get("prediction_id") if isinstance(meta, dict) else None
        if len(chosen) != 1:
            found.problems.append(f"{where}: {len(chosen)} choices; one label per text")
        elif labels is not None and chosen[0] not in labels:
            found.problems.append(f"{where}: unknown label {chosen[0]!r} (known: {', '.join(sorted(labels))})")
        elif not isinstance(text, str) or not text.strip():
            found.problems.append(f"{where}: data.{TEXT_NAME} is missing or blank")
        elif len(text) > max_chars:
            found.problems.append(f"{where}: text of {len(text)} characters is over the {max_chars} limit")
        else:
            known_id = prediction_id if isinstance(prediction_id, str) and prediction_id else None
            found.items.append(TaskLabel(text.strip(), chosen[0], known_id))
    return found


def import_tasks(
    store: FeedbackStore,
    tasks: LabelStudioTasks,
    principal: str,
    on_saved: Callable[[FeedbackPublic], None] | None = None,
) -> LabelStudioImport:
    """Store the labels of ``tasks`` as feedback of ``principal``; importing the same export again changes nothing.

    A label corrects its prediction when this store has it (as ``POST /feedback`` with a ``prediction_id`` does),
    else it labels the text. ``on_saved`` sees each created or updated row once its chunk is committed. Labels the
    model lacks and no admin added are counted as refused (``read_tasks`` given the allowed labels reports them
    before anything is stored).
    """
    result = LabelStudioImport()
    texts: list[tuple[str, str]] = []
    for start in range(0, len(tasks.items), CHUNK):
        chunk = tasks.items[start : start + CHUNK]
        ids = [item.prediction_id for item in chunk if item.prediction_id is not None]
        with store.database.read_session() as session:
            known = set(session.exec(select(Prediction.prediction_id).where(col(Prediction.prediction_id).in_(ids))))
            before = dict(
                session.exec(
                    select(Feedback.prediction_id, Feedback.label).where(
                        col(Feedback.source) == principal, col(Feedback.prediction_id).in_(ids)
                    )
                ).all()
            )
        changed: list[tuple[FeedbackCreate, bool]] = []
        for item in chunk:
            if item.prediction_id not in known:
                texts.append((item.text, item.label))
            elif before.get(item.prediction_id) == item.label:
                result.unchanged += 1
            else:
                create = FeedbackCreate(prediction_id=item.prediction_id, label=item.label)
                changed.append((create, item.prediction_id in before))
        outcomes = store.submit_many([(create, principal) for create, _ in changed])
        for (_, existed), outcome in zip(changed, outcomes, strict=True):
            if isinstance(outcome, UnknownLabelError):
                result.refused += 1
            elif isinstance(outcome, FeedbackConflictError):
                # A model was trained on the principal's earlier label of this prediction: that one stays.
                result.used += 1
            else:
                if existed:
                    result.updated += 1
                else:
                    result.created += 1
                if on_saved is not None:
                    on_saved(outcome)
    if texts:
        by_text = store.import_labels(texts, principal, on_saved=on_saved)
        for name in ("created", "updated", "unchanged", "used"):
            setattr(result, name, getattr(result, name) + getattr(by_text, name))
    return result


def write_tasks(store: FeedbackStore, rows: Iterable[FeedbackPublic], queue: int | None, stream: TextIO) -> int:
    """Write one JSON list of tasks to ``stream``: the first ``queue`` review-queue items (at most
    ``feedback.review.MAX_LIMIT``) to label, or without ``queue`` the labels ``rows``; returns how many tasks."""
    if queue is not None:
        tasks = queue_tasks(ReviewQueue(store.database, store.settings).next(queue))
    else:
        tasks = label_tasks(rows)
    json.dump(tasks, stream, ensure_ascii=False, indent=2)
    stream.write("\n")
    return len(tasks)


def read_export(path: Path, labels: Collection[str] | None, max_chars: int) -> LabelStudioTasks:
    """The labels in the Label Studio JSON export at ``path`` (see ``read_tasks``)."""
    return read_tasks(load_export(path), labels, max_chars)


def load_export(path: Path) -> Any:
    """The parsed JSON of a Label Studio export file, or AnnotationFileError saying why it cannot be read."""
    if not path.is_file():
        raise AnnotationFileError(f"Label Studio export not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AnnotationFileError(f"{path} is not valid UTF-8 (byte {exc.start}): re-export it") from exc
    except json.JSONDecodeError as exc:
        raise AnnotationFileError(
            f"{path} is not JSON ({exc.msg}, line {exc.lineno}): export the project from Label Studio as JSON"
        ) from exc
