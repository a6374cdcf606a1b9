"""Label Studio round trips: the review queue exported as tasks with the model's guess as a prediction, annotated
as a Label Studio annotator would, imported back as feedback of the importing principal; by command line on both
databases, and over HTTP for admins."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from feedback.label_studio import read_tasks
from feedback.prediction_rows import prediction_row
from feedback.store import FeedbackStore
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.events import utcnow
from flywheel.models.feedback import Feedback, FeedbackStatus
from tests.conftest import app_client, copy_home, run_cli, settings_from
from tests.feedback.conftest import prediction

pytestmark = pytest.mark.slow

#: ``(text, P(positive))`` of the logged predictions, least confident first as the queue orders them.
LOGGED = [
    ("it is fine I suppose", 0.5),
    ("the strap broke but support was quick", 0.45),
    ("works as described", 0.6),
    ("a delight from start to finish", 0.97),
]


def annotated(task: dict[str, Any], *labels: str, cancelled: bool = False) -> dict[str, Any]:
    """``task`` as Label Studio exports it once an annotator chose ``labels`` (one annotation each, oldest first)."""
    annotations = [
        {
            "id": 100 + number,
            "completed_by": 1,
            "result": [
                {
                    "value": {"choices": [label]},
                    "id": f"r{number}",
                    "from_name": "label",
                    "to_name": "text",
                    "type": "choices",
                    "origin": "manual",
                }
            ],
            "was_cancelled": cancelled,
            "ground_truth": False,
            "created_at": "2026-12-03T10:00:00.000000Z",
            "lead_time": 4.2,
            "task": task.get("id", 0),
        }
        for number, label in enumerate(labels)
    ]
    return {**task, "annotations": annotations, "drafts": [], "file_upload": "queue.json"}


@pytest.fixture()
def home(
    database_url: str, trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> Iterator[tuple[dict[str, str], FeedbackStore, list[str]]]:
    """A home with the tiny champion on the test database, holding the ``LOGGED`` predictions."""
    env = {
        **copy_home(trained_home, tmp_path / "home"),
        "FLYWHEEL_DATABASE_URL": database_url,
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
    }
    settings = settings_from(env)
    store = FeedbackStore(Database.from_settings(settings).upgrade(), settings)
    now = utcnow()
    events = [prediction(text, positive, at=now) for text, positive in LOGGED]
    store.ingest([prediction_row(event, now) for event in events])
    yield env, store, [event.prediction_id for event in events]
    store.database.dispose()


def test_queue_round_trip_through_label_studio_files(
    home: tuple[dict[str, str], FeedbackStore, list[str]], tmp_path: Path
) -> None:
    env, store, ids = home
    tasks_file, config_file = tmp_path / "queue.json", tmp_path / "config.xml"

    exported = run_cli(
        env, "feedback", "export", "--format", "label-studio", "--queue", "10",
        "--output", str(tasks_file), "--label-config", str(config_file),
    )  # fmt: skip

    assert exported.returncode == 0, exported.stderr
    assert f"wrote 4 tasks to {tasks_file}" in exported.stderr
    tasks = json.loads(tasks_file.read_text())
    assert [task["meta"]["prediction_id"] for task in tasks] == ids
    for task, (text, positive) in zip(tasks, LOGGED, strict=True):
        guess = "positive" if positive > 0.5 else "negative"
        assert task["data"] == {"text": text}
        [predicted] = task["predictions"]
        assert predicted["score"] == pytest.approx(max(positive, 1 - positive))
        [result] = predicted["result"]
        assert {k: result[k] for k in ("from_name", "to_name", "type", "value")} == {
            "from_name": "label",
            "to_name": "text",
            "type": "choices",
            "value": {"choices": [guess]},
        }
    config = ET.fromstring(config_file.read_text())
    assert config.find("Text").attrib == {"name": "text", "value": "$text"}  # type: ignore[union-attr]
    choices = config.find("Choices")
    assert choices is not None and (choices.get("name"), choices.get("toName")) == ("label", "text")
    assert [choice.get("value") for choice in choices] == ["negative", "positive"]

    # In Label Studio: tasks get ids, annotators choose, one cancels, one changes their mind, one adds a task.
    tasks = [{**task, "id": number} for number, task in enumerate(tasks, start=1)]
    project = [
        annotated(tasks[0], "positive"),
        annotated(tasks[1], "negative"),
        annotated(tasks[2], "positive", cancelled=True),
        annotated(tasks[3], "negative", "positive"),
        annotated({"id": 9, "data": {"text": "typed into Label Studio: love it"}}, "positive"),
        annotated({"id": 10, "data": {"text": "not a label we know"}}, "meh"),
        {"id": 11, "data": {"text": "nobody got to this one"}, "annotations": []},
    ]
    export = tmp_path / "project-1-at-2026-12-03.json"
    export.write_text(json.dumps(project))

    imported = run_cli(env, "feedback", "import", str(export), "--format", "label-studio", "--source", "ls-team")

    assert imported.returncode == 0, imported.stderr
    assert f"imported {export.name} as 'ls-team': 4 new, 0 updated, 0 unchanged" in imported.stdout
    assert "skipped 1 rows: task 6: unknown label 'meh' (known: negative, positive)" in imported.stderr
    with store.database.read_session() as session:
        rows = {row.text: row for row in session.exec(select(Feedback).where(col(Feedback.source) == "ls-team"))}
    assert {text: (row.prediction_id, row.label) for text, row in rows.items()} == {
        LOGGED[0][0]: (ids[0], "positive"),
        LOGGED[1][0]: (ids[1], "negative"),
        LOGGED[3][0]: (ids[3], "positive"),
        "typed into Label Studio: love it": (None, "positive"),
    }
    # Vetted as any label: consistent with the model's scores of the prediction it corrects, so accepted.
    assert {row.status for text, row in rows.items() if row.prediction_id} == {FeedbackStatus.ACCEPTED}

    again = run_cli(env, "feedback", "import", str(export), "--format", "label-studio", "--source", "ls-team")
    assert "0 new, 0 updated, 4 unchanged" in again.stdout, again.stderr

    labels_file = tmp_path / "labels.json"
    out = run_cli(env, "feedback", "export", "--format", "label-studio", "--output", str(labels_file))
    assert out.returncode == 0, out.stderr
    labelled = {task["data"]["text"]: task for task in json.loads(labels_file.read_text())}
    assert set(labelled) == set(rows)
    for text, row in rows.items():
        [annotation] = labelled[text]["annotations"]
        assert annotation["result"][0]["value"] == {"choices": [row.label]}
        assert labelled[text]["meta"]["feedback_id"] == row.feedback_id
    refused = run_cli(env, "feedback", "export", "--queue", "5")
    assert refused.returncode == 2 and "need label-studio" in refused.stderr


def test_admins_export_and_import_over_http(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = {**copy_home(trained_home, tmp_path / "home"), "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}
    settings = settings_from(env)
    store = FeedbackStore(Database.from_settings(settings).upgrade(), settings)
    keys = {}
    for name, role in (("ls-admin", "admin"), ("ls-annotator", "annotator")):
        created = run_cli(env, "keys", "create", name, "--role", role)
        assert created.returncode == 0, created.stderr
        keys[role] = {"X-API-Key": created.stdout.strip().splitlines()[-1]}
    now = utcnow()
    event = prediction(LOGGED[0][0], LOGGED[0][1], at=now)
    store.ingest([prediction_row(event, now)])

    with app_client(env) as http:
        assert http.get("/desk/label-studio/tasks?what=queue", headers=keys["annotator"]).status_code == 403
        tasks = http.get("/desk/label-studio/tasks?what=queue", headers=keys["admin"]).json()
        assert [task["meta"]["prediction_id"] for task in tasks] == [event.prediction_id]
        config = http.get("/desk/label-studio/config", headers=keys["admin"])
        assert config.status_code == 200 and '<Choice value="positive"/>' in config.text

        answer = http.post(
            "/desk/label-studio/annotations",
            content=json.dumps([annotated({**tasks[0], "id": 1}, "negative")]),
            headers=keys["admin"],
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "created": 1, "updated": 0, "unchanged": 0, "used": 0, "refused": 0, "unannotated": 0, "problems": [],
        }  # fmt: skip
        for body, status in ((b"", 400), (b"[{", 400), (b'{"data": 1}', 200)):
            refused = http.post("/desk/label-studio/annotations", content=body, headers=keys["admin"])
            assert refused.status_code == status, (body, refused.text)
        assert refused.json()["problems"] == ["task 1: not a Label Studio task (an object with a data object)"]
        labels = http.get("/desk/label-studio/tasks?what=labels", headers=keys["admin"]).json()
    [row] = [task for task in labels if task["meta"]["prediction_id"] == event.prediction_id]
    assert row["meta"]["source"] == "ls-admin"
    assert row["annotations"][0]["result"][0]["value"]["choices"] == ["negative"]
    store.database.dispose()


def test_problems_of_exported_tasks_are_reported_not_imported() -> None:
    one_choice = {"type": "choices", "from_name": "label", "value": {"choices": ["positive"]}}
    tasks = [
        "not a task",
        {
            "data": {"text": "two at once"},
            "annotations": [{"result": [{**one_choice, "value": {"choices": ["a", "b"]}}]}],
        },
        {"data": {"text": "  "}, "annotations": [{"result": [one_choice]}]},
        {"data": {"text": "x" * 30}, "annotations": [{"result": [one_choice]}]},
        {"data": {"text": "kept"}, "meta": {"prediction_id": "p1"}, "annotations": [{"result": [one_choice]}]},
        {"data": {"text": "only a rating"}, "annotations": [{"result": [{"type": "rating", "value": {"rating": 3}}]}]},
    ]

    found = read_tasks(tasks, ["negative", "positive"], max_chars=20)

    assert [(item.text, item.label, item.prediction_id) for item in found.items] == [("kept", "positive", "p1")]
    assert found.problems == [
        "task 1: not a Label Studio task (an object with a data object)",
        "task 2: 2 choices; one label per text",
        "task 3: data.text is missing or blank",
        "task 4: text of 30 characters is over the 20 limit",
    ]
    assert found.unannotated == 1
