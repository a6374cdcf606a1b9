"""Drift runs through the real store: predictions served, logged to Kafka, ingested, analysed, served back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.events import AlertEvent, AlertKind, Topic
from tests.conftest import copy_home, free_port, read_topic, run_cli, running_service, wait_until
from tests.monitoring import browser
from tests.monitoring.conftest import FLYWHEEL, GERMAN_WORDS, ingest_all, word_sentences

pytestmark = pytest.mark.slow
ADMIN_TOKEN = "drift-admin-token"

SHIFTED_ROWS = 240
TARGETED = 10


@dataclass
class Drifted:
    """A served home after shifted traffic went through the whole pipeline and a CLI drift run."""

    base: str
    env: dict[str, str]
    bootstrap: str
    report_id: str
    prediction_ids: list[str]
    empty_run: subprocess.CompletedProcess[str]
    run: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def drifted(trained_home: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drifted]:
    """Service + private broker; German texts predicted, ingested by `flywheel ingest`, then `flywheel drift run`."""
    directory = tmp_path_factory.mktemp("drift-e2e")
    broker = EmbeddedBroker(port=free_port()).start()
    env = {
        **copy_home(trained_home, directory / "home"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLYWHEEL_INGEST_MAX_POLL_INTERVAL_MS": "2000",
        "FLYWHEEL_DRIFT_TARGETED_LABELS": str(TARGETED),
        "FLYWHEEL_TORCH_THREADS": "1",
    }
    try:
        with running_service(env) as base:
            wait_until(lambda: httpx.get(f"{base}/drift/reports", timeout=10).status_code == 200, 60, "the index")
            empty_run = run_cli(env, "drift", "run")

            texts = word_sentences(GERMAN_WORDS, SHIFTED_ROWS, seed=7)
            ids: list[str] = []
            for chunk in (texts[:120], texts[120:]):
                answer = httpx.post(f"{base}/predict", json={"texts": chunk}, timeout=120)
                assert answer.status_code == 200, answer.text
                ids += [p["prediction_id"] for p in answer.json()["predictions"]]
            ingest_all(env, SHIFTED_ROWS)

            run = run_cli(env, "drift", "run")
            assert run.returncode == 0, run.stderr[-3000:]
            match = re.search(r"drift report ([0-9a-f-]{36}): (\w+)", run.stdout)
            assert match is not None, run.stdout
            yield Drifted(base, env, broker.bootstrap, match.group(1), ids, empty_run, run)
    finally:
        broker.stop()


def test_empty_window_is_insufficient_data(drifted: Drifted) -> None:
    assert drifted.empty_run.returncode == 0, drifted.empty_run.stderr[-3000:]
    assert ": insufficient_data — insufficient data: 0 predictions in the window" in drifted.empty_run.stdout


def test_cli_run_writes_html_json_and_a_database_row(drifted: Drifted) -> None:
    assert f"drift report {drifted.report_id}: drifted" in drifted.run.stdout
    directory = Path(drifted.env["FLYWHEEL_HOME"]) / "monitoring" / "reports" / drifted.report_id
    assert f"report: {directory / 'report.html'}" in drifted.run.stdout
    assert (directory / "report.html").stat().st_size > 100_000
    assert '"verdict": "drifted"' in (directory / "summary.json").read_text()

    rows = httpx.get(f"{drifted.base}/drift/reports", timeout=30).json()
    assert [r["verdict"] for r in rows[:2]] == ["drifted", "insufficient_data"]
    row = rows[0]
    assert row["report_id"] == drifted.report_id
    assert row["current_rows"] == SHIFTED_ROWS
    assert row["reference_rows"] > 200
    assert row["duration_seconds"] > 0
    assert row["window_start"] is not None
    assert "text_content" in row["fired"]
    assert row["signals"]["text_content"]["score"] > row["signals"]["text_content"]["threshold"]


def test_latest_and_report_are_served(drifted: Drifted) -> None:
    base = drifted.base
    latest = httpx.get(f"{base}/drift/latest", timeout=30).json()
    assert latest["report_id"] == drifted.report_id
    assert latest["verdict"] == "drifted"
    assert {"text_content", "descriptor.oov_share"} <= set(latest["fired"])
    assert latest["performance"]["rows"] == SHIFTED_ROWS
    assert latest["performance"]["estimated_accuracy"] is not None
    assert "over-samples wrong predictions" in latest["performance"]["note"]

    page = httpx.get(f"{base}/drift/reports/{drifted.report_id}", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "flywheel-summary" in page.text
    assert "drawDashboard" in page.text
    summary = httpx.get(f"{base}/drift/reports/{drifted.report_id}/summary", timeout=30).json()
    assert summary == latest

    unknown = httpx.get(f"{base}/drift/reports/{uuid.uuid4()}", timeout=30)
    assert unknown.status_code == 404
    assert "no drift report" in unknown.json()["detail"]
    malformed = httpx.get(f"{base}/drift/reports/..%2F..%2Fregistry", timeout=30)
    assert malformed.status_code == 404
    assert httpx.get(f"{base}/drift/reports", params={"limit": 0}, timeout=30).status_code == 422


def test_drifted_verdict_is_published_on_alerts(drifted: Drifted) -> None:
    events = read_topic(
        drifted.bootstrap,
        Topic.ALERTS,
        lambda seen: any(getattr(e, "report_id", None) == drifted.report_id for e in seen),
    )
    ours = [e for e in events if isinstance(e, AlertEvent) and e.report_id == drifted.report_id]
    # The shifted texts also move the predicted label shares; those alerts have their own kind.
    alerts = [e for e in ours if e.kind == AlertKind.DRIFT]
    assert len(alerts) == 1
    assert all(e.kind == AlertKind.LABEL_SHARE and e.label for e in ours if e not in alerts)
    alert = alerts[0]
    assert alert.verdict == "drifted"
    assert alert.current_rows == SHIFTED_ROWS
    assert "text_content" in alert.signals
    assert alert.signals["text_content"]["score"] > alert.signals["text_content"]["threshold"]
    latest = httpx.get(f"{drifted.base}/drift/latest", timeout=30).json()
    assert latest["alert_event_id"] == alert.event_id


def test_targets_and_gauges(drifted: Drifted) -> None:
    targets = httpx.get(f"{drifted.base}/drift/targets", timeout=30).json()
    assert len(targets) == TARGETED
    assert {t["prediction_id"] for t in targets} <= set(drifted.prediction_ids)
    assert all(t["report_id"] == drifted.report_id for t in targets)

    httpx.get(f"{drifted.base}/drift/latest", timeout=30)
    metrics = httpx.get(f"{drifted.base}/metrics", timeout=30).text
    assert re.search(r"^flywheel_drift_detected(\{[^}]*\})? 1\.0$", metrics, re.MULTILINE), metrics[-3000:]
    score = re.search(r'^flywheel_drift_signal_score\{[^}]*signal="text_content"[^}]*\} ([0-9.e+-]+)$', metrics, re.M)
    assert score is not None
    assert float(score.group(1)) > 0.6


def test_pages_render_in_headless_chromium(drifted: Drifted) -> None:
    index = browser.load(f"{drifted.base}/drift")
    assert index.errors == []
    assert 'id="drift-chart"' in index.dom
    assert 'class="run drifted"' in index.dom
    assert 'class="run insufficient_data"' in index.dom
    assert f'href="/drift/reports/{drifted.report_id}"' in index.dom

    report = browser.load(f"{drifted.base}/drift/reports/{drifted.report_id}", budget_ms=20_000)
    assert report.errors == []
    assert "flywheel-summary" in report.dom
    # Evidently's bundled script drew the dashboard into its (initially empty) root element.
    assert re.search(r'<div id="root_metric_\w+">\s*<div', report.dom), report.dom[-2000:]


def test_post_drift_run_starts_one_run_at_a_time(drifted: Drifted) -> None:
    base = drifted.base
    before = httpx.get(f"{base}/drift/latest", timeout=30).json()["report_id"]
    assert httpx.post(f"{base}/drift/run", timeout=30).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    started = httpx.post(f"{base}/drift/run", headers=admin, timeout=30)
    assert started.status_code == 202, started.text
    assert started.json()["poll"] == "/drift/latest"
    again = httpx.post(f"{base}/drift/run", headers=admin, timeout=30)
    assert again.status_code == 409
    assert "already running" in again.json()["detail"]

    def finished() -> bool:
        return httpx.get(f"{base}/drift/latest", timeout=30).json()["report_id"] != before

    wait_until(finished, 180, "the API-triggered report")
    latest = httpx.get(f"{base}/drift/latest", timeout=30).json()
    assert latest["verdict"] == "drifted"
    assert latest["current_rows"] == SHIFTED_ROWS


def test_browser_check_catches_script_errors(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><body><p id=x>before</p><script>document.getElementById('x').textContent='after';"
        "missingFunction();</script></body></html>"
    )

    loaded = browser.load(page.as_uri(), budget_ms=1000)

    assert ">after<" in loaded.dom
    assert any("missingFunction is not defined" in e for e in loaded.errors), loaded.console


def test_drift_watch_reports_at_once_and_stops_on_sigterm(drifted: Drifted) -> None:
    def count() -> int:
        return len(httpx.get(f"{drifted.base}/drift/reports", params={"limit": 500}, timeout=30).json())

    before = count()
    watch = subprocess.Popen(
        [FLYWHEEL, "drift", "watch"],
        env={**os.environ, **drifted.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: count() > before, 180, "the first scheduled report")
    finally:
        watch.send_signal(signal.SIGTERM)
        output, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0, output[-3000:]
    assert "drift reports every 3600s" in output
