"""``flywheel feedback import|export|stats|vet|review|resolve|confirm`` and ``flywheel sources`` through the console
script's ``main``."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.events import FeedbackEvent, Topic
from tests.conftest import copy_home, read_topic, run_cli, scratch_database_url

pytestmark = pytest.mark.slow



run = run_cli


@pytest.fixture()
def cli_env(trained_home: dict[str, str], tmp_path: Path, broker: EmbeddedBroker) -> Iterator[dict[str, str]]:
    """A champion home on PostgreSQL (the SQLite flow is the vetting test below) and the session broker."""
    with scratch_database_url("postgresql", tmp_path) as url:
        env = copy_home(trained_home, tmp_path / "home")
        yield {**env, "FLYWHEEL_DATABASE_URL": url, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}


def test_import_export_and_stats(cli_env: dict[str, str], tmp_path: Path) -> None:
    annotations = tmp_path / "batch.jsonl"
    token = uuid.uuid4().hex[:8]
    rows = [
        {"text": f"a wonderful, lovely film {token}", "label": "positive"},
        {"text": "awful and boring", "label": "negative"},
        {"text": "no idea", "label": "neutral"},
        {"text": "   ", "label": "positive"},
    ]
    annotations.write_text("\n".join(json.dumps(row) for row in rows) + "\n{broken\n")

    # The annotation team's labels skip vetting only once an operator trusts the team.
    trusted = run(cli_env, "sources", "trust", "annotation", "--as", "ops")
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.startswith("annotation: trusted, not quarantined")
    first = run(cli_env, "feedback", "import", str(annotations))
    assert first.returncode == 0, first.stderr
    assert "imported batch.jsonl as 'annotation': 2 new, 0 updated, 0 unchanged" in first.stdout
    assert "skipped 3 rows" in first.stderr
    assert "line 3: unknown label 'neutral' (known: negative, positive)" in first.stderr
    assert "line 4: blank text" in first.stderr and "line 5: not JSON" in first.stderr
    again = run(cli_env, "feedback", "import", str(annotations))
    assert "0 new, 0 updated, 2 unchanged" in again.stdout

    exported = tmp_path / "out.csv"
    export = run(cli_env, "feedback", "export", "--output", str(exported))
    assert export.returncode == 0, export.stderr
    with exported.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert {(r["text"], r["label"], r["source"], r["status"]) for r in table} == {
        (f"a wonderful, lovely film {token}", "positive", "annotation", "accepted"),
        ("awful and boring", "negative", "annotation", "accepted"),
    }

    published = read_topic(
        cli_env["FLYWHEEL_KAFKA_BOOTSTRAP"],
        Topic.FEEDBACK.value,
        lambda events: any(token in (getattr(event, "text", "") or "") for event in events),
    )
    ours = [event for event in published if isinstance(event, FeedbackEvent) and token in (event.text or "")]
    assert [(event.label, event.source, event.status) for event in ours] == [("positive", "annotation", "accepted")]

    stats = run(cli_env, "feedback", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["by_status"] == {"accepted": 2}
    assert data["by_label"] == {"negative": 1, "positive": 1}
    assert [(s["source"], s["trusted"]) for s in data["sources"]] == [("annotation", True)]


def test_import_errors_are_one_line(trained_home: dict[str, str], tmp_path: Path) -> None:
    env = {**copy_home(trained_home, tmp_path / "home"), "FLYWHEEL_DATABASE_URL": f"sqlite:///{tmp_path}/f.db"}
    missing = run(env, "feedback", "import", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: annotation file not found: {tmp_path / 'nope.csv'}"
    columns = tmp_path / "wrong.csv"
    columns.write_text("sentence,tag\nhello,positive\n")
    wrong = run(env, "feedback", "import", str(columns))
    assert wrong.returncode == 2
    assert wrong.stderr.startswith(f"error: {columns} has no column 'text', 'label'; found ['sentence', 'tag']")
    source = run(env, "feedback", "import", str(columns), "--source", "team a")
    assert source.returncode == 2
    assert source.stderr.startswith("error: invalid source 'team a'")


def test_untrusted_import_is_vetted_by_the_champion_then_reviewed(
    trained_home: dict[str, str], tmp_path: Path
) -> None:
    env = {**copy_home(trained_home, tmp_path / "home"), "FLYWHEEL_DATABASE_URL": f"sqlite:///{tmp_path}/f.db",
           "FLYWHEEL_KAFKA_BOOTSTRAP": "127.0.0.1:9"}
    unmigrated = run(env, "feedback", "stats")
    assert unmigrated.returncode == 2
    assert unmigrated.stderr.strip().endswith("run `flywheel db upgrade` first"), unmigrated.stderr
    upgraded = run(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "is at schema " in upgraded.stdout and "no tables" not in upgraded.stdout
    crowd = tmp_path / "crowd.csv"
    crowd.write_text("text,label\ngood great excellent wonderful,negative\nbad awful terrible,negative\n")
    assert run(env, "feedback", "import", str(crowd), "--source", "crowd").returncode == 0

    vetted = run(env, "feedback", "vet")
    assert vetted.returncode == 0, vetted.stderr
    assert "vetted 2 labels against model" in vetted.stdout
    rows = {row["text"]: row for row in csv.DictReader(run(env, "feedback", "export").stdout.splitlines())}
    assert all(row["model_label"] and row["label_quality"] for row in rows.values())
    assert rows["bad awful terrible"]["status"] == "accepted"

    review = run(env, "feedback", "review")
    assert review.returncode == 0, review.stderr
    target = rows["good great excellent wonderful"]["feedback_id"]
    decided = run(env, "feedback", "resolve", target, "--reject", "--reason", "checked", "--as", "rita")
    assert decided.stdout.strip() == f"{target}: rejected"
    confirmed = run(env, "feedback", "confirm", target, "--as", "rita")
    assert confirmed.stdout.strip() == f"{target}: accepted, confirmed by rita"

    held = run(env, "sources", "quarantine", "crowd", "--reason", "copied labels")
    assert "crowd: not trusted, quarantined (copied labels)" in held.stdout, held.stderr
    assert "not quarantined" in run(env, "sources", "release", "crowd").stdout
    assert run(env, "sources", "trust", "crowd").returncode == 0
    listed = json.loads(run(env, "sources", "list", "--json").stdout)
    assert [(s["source"], s["trusted"], s["quarantined"]) for s in listed] == [("crowd", True, False)]
    audit = run(env, "audit", "--limit", "10").stdout
    for actor, action in (("rita", "feedback.reject"), ("rita", "feedback.accept"), ("cli", "source.quarantine"),
                          ("cli", "source.release"), ("cli", "source.trust")):
        assert any(actor in line and action in line for line in audit.splitlines()), (actor, action, audit)
    unknown = run(env, "feedback", "confirm", "nope")
    assert (unknown.returncode, unknown.stderr.strip()) == (2, "error: no feedback with id 'nope'")
