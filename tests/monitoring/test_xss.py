"""Hostile predicted texts cannot script the ops pages: escaped before the report is stored, refused by its CSP.

The payloads mark the page's root element (``data-pwnedN``) when they run, which the DOM chromium dumps shows;
they carry no quotes, because Evidently's JSON escapes quotes into ``\\"`` and that alone would make them inert.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flywheel.broker import EmbeddedBroker
from monitoring.reports import HTML_FILE, SCRIPTS_FILE, SUMMARY_FILE
from monitoring.safe_page import SafePage, escaped, safe_page
from tests.conftest import copy_home, free_port, run_cli, running_service
from tests.monitoring import browser
from tests.monitoring.conftest import GERMAN_WORDS, ingest_all, word_sentences
from tests.monitoring.test_pages import Parsed

PAYLOADS = [
    "</script><script>document.documentElement.dataset.pwned1=1</script>",
    "<img src=x onerror=document.documentElement.dataset.pwned2=2>",
    "<svg onload=document.documentElement.dataset.pwned3=3>",
]
PWNED = re.compile(r"data-pwned\d")
DRAWN = re.compile(r'<div id="root_metric_\w+">\s*<div')
HOSTILE_ROWS = 60
_UNESCAPES = {"\\u003c": "<", "\\u003e": ">", "\\u0026": "&"}


def evidently_shaped(texts: list[str], bundle: str = "") -> str:
    """A page laid out like Evidently 0.7's report template, ``texts`` in its data, ``bundle`` as its library."""
    data = json.dumps({"widgets": [{"params": {"data": [[text, ""] for text in texts]}}]})
    return (
        "<!DOCTYPE html><html><head>\n<script>\n"
        f"    var metric_0a1b = {data};\n"
        "    var additional_graphs_metric_0a1b = {};\n"
        '</script>\n</head><body><div id="root_metric_0a1b"></div>\n'
        "<script>var global = globalThis</script>\n"
        f"{bundle}\n"
        "<script>\n    window.drawDashboard(metric_0a1b,\n"
        "        new Map(Object.entries(additional_graphs_metric_0a1b)),\n"
        '        "root_metric_0a1b"\n    );\n    </script>\n'
        "</body></html>"
    )


def test_escaped_data_reads_the_same_and_opens_no_tag() -> None:
    texts = [*PAYLOADS, "a & b \u2028 c \u2029 <!-- d"]
    page = evidently_shaped(texts)

    safe = safe_page(page)

    assert "</script><script>" not in safe.html
    assert "<img" not in safe.html and "<svg" not in safe.html and "<!--" not in safe.html
    parsed = Parsed(safe.html)
    assert parsed.tags.count("script") == 3
    assert not {"img", "svg"} & set(parsed.tags)
    line = next(line for line in safe.html.splitlines() if "var metric_0a1b = " in line)
    data = json.loads(line.split(" = ", 1)[1].removesuffix(";"))
    assert [row[0] for row in data["widgets"][0]["params"]["data"]] == texts
    # The page's three scripts are Evidently's own shapes: all of them may run, once each.
    assert len(safe.script_hashes) == 3
    assert safe_page(safe.html) == safe
    assert escaped(safe.html) == safe.html


def test_scripts_of_other_shapes_get_no_hash() -> None:
    page = evidently_shaped(["x"])
    mine = safe_page(page).script_hashes
    injected = [
        "<script>document.documentElement.dataset.pwned1=1</script>",
        '<script>\n    var location = "javascript:alert(1)";\n</script>',
        "<script>\n    var metric_0a1b = 1; alert(1);\n</script>",
        "<script>\n    var metric_0a1b = {};\n    alert(1);\n</script>",
    ]

    for script in injected:
        assert safe_page(page.replace("</body>", script + "</body>")).script_hashes == mine, script


def test_headers_allow_only_the_listed_scripts() -> None:
    page = SafePage("<p>hi</p>", ("sha256-AAAA", "sha256-BBBB"))
    policy = page.headers["Content-Security-Policy"]

    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "script-src 'sha256-AAAA' 'sha256-BBBB';" in policy
    assert "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    for directive in ("default-src 'none'", "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "form-action 'self'" in policy
    assert "script-src 'none'" in SafePage("<p>hi</p>").headers["Content-Security-Policy"]


def test_payloads_run_in_a_raw_page_and_not_in_a_safe_one(tmp_path: Path) -> None:
    # A stand-in for Evidently's bundle: it shows the texts it finds in the data, as text.
    bundle = (
        "<script>window.drawDashboard = (info, graphs, root) => document.getElementById(root).textContent = "
        "info.widgets[0].params.data.map(row => row[0]).join(' | ')</script>"
    )
    raw = tmp_path / "raw.html"
    raw.write_text(evidently_shaped(PAYLOADS, bundle))
    safe = tmp_path / "safe.html"
    safe.write_text(safe_page(evidently_shaped(PAYLOADS, bundle)).html)

    raw_dom = browser.load(raw.as_uri(), budget_ms=1000).dom
    safe_page_ = browser.load(safe.as_uri(), budget_ms=1000)

    assert set(PWNED.findall(raw_dom)) == {"data-pwned1", "data-pwned2", "data-pwned3"}
    assert not PWNED.search(safe_page_.dom)
    assert safe_page_.errors == []
    assert "&lt;/script&gt;&lt;script&gt;document.documentElement.dataset.pwned1=1" in safe_page_.dom
    assert "&lt;svg onload=document.documentElement.dataset.pwned3=3&gt;" in safe_page_.dom


@dataclass
class Hostile:
    """A served home whose drift report was built from hostile predicted texts, and a pre-escaping copy of it."""

    base: str
    reports: Path
    report_id: str
    legacy_id: str
    raw_html: Path


def unescaped(html: str) -> str:
    """The page as Flywheel stored it before reports were escaped (Evidently writes none of these escapes)."""
    lines = html.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if re.match(r"\s*var (additional_graphs_)?metric_[0-9a-f]+ = ", line):
            for escape, character in _UNESCAPES.items():
                lines[number] = lines[number].replace(escape, character)
    return "".join(lines)


@pytest.fixture(scope="module")
def hostile(trained_home: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """Hostile texts predicted by the service, logged to Kafka, ingested into the store, then `flywheel drift run`."""
    directory = tmp_path_factory.mktemp("xss")
    broker = EmbeddedBroker(port=free_port()).start()
    env = {
        **copy_home(trained_home, directory / "home"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_INGEST_MAX_POLL_INTERVAL_MS": "2000",
        "FLYWHEEL_DRIFT_MIN_ROWS": str(HOSTILE_ROWS),
        "FLYWHEEL_DRIFT_TARGETED_LABELS": "0",
        "FLYWHEEL_TORCH_THREADS": "1",
    }
    # Every text carries a payload, so whichever texts Evidently picks as examples are hostile.
    words = word_sentences(GERMAN_WORDS, HOSTILE_ROWS, seed=3)
    texts = [f"{PAYLOADS[i % len(PAYLOADS)]} {sentence}" for i, sentence in enumerate(words)]
    try:
        with running_service(env) as base:
            answer = httpx.post(f"{base}/predict", json={"texts": texts}, timeout=120)
            assert answer.status_code == 200, answer.text
            ingest_all(env, HOSTILE_ROWS)
            run = run_cli(env, "drift", "run")
            assert run.returncode == 0, run.stderr[-3000:]
            match = re.search(r"drift report ([0-9a-f-]{36}): (drifted|no_drift)", run.stdout)
            assert match is not None, run.stdout

            # A copy as it would have been stored before escaping: raw HTML, no hashes file.
            reports = Path(env["FLYWHEEL_HOME"]) / "monitoring" / "reports"
            legacy_id = str(uuid.uuid4())
            legacy = reports / legacy_id
            legacy.mkdir()
            raw_html = legacy / HTML_FILE
            raw_html.write_text(unescaped((reports / match.group(1) / HTML_FILE).read_text()))
            shutil.copy(reports / match.group(1) / SUMMARY_FILE, legacy / SUMMARY_FILE)
            yield Hostile(base, reports, match.group(1), legacy_id, raw_html)
    finally:
        broker.stop()


@pytest.mark.slow
def test_hostile_texts_are_stored_escaped(hostile: Hostile) -> None:
    stored = (hostile.reports / hostile.report_id / HTML_FILE).read_text()

    for payload in PAYLOADS:
        assert payload not in stored
    assert "\\u003c/script\\u003e\\u003cscript\\u003edocument.documentElement.dataset.pwned1=1" in stored
    assert "\\u003csvg onload=document.documentElement.dataset.pwned3=3\\u003e" in stored
    assert len((hostile.reports / hostile.report_id / SCRIPTS_FILE).read_text().split()) == 4
    # The pre-escaping copy really is hostile: its own payload opened a script element.
    assert PAYLOADS[0] in hostile.raw_html.read_text()


@pytest.mark.slow
def test_pages_carry_nosniff_and_a_restrictive_csp(hostile: Hostile) -> None:
    index = httpx.get(f"{hostile.base}/drift", timeout=30)
    hashes = (hostile.reports / hostile.report_id / SCRIPTS_FILE).read_text().split()
    report = httpx.get(f"{hostile.base}/drift/reports/{hostile.report_id}", timeout=30)
    legacy = httpx.get(f"{hostile.base}/drift/reports/{hostile.legacy_id}", timeout=30)

    for page in (index, report, legacy):
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["x-content-type-options"] == "nosniff"
        policy = page.headers["content-security-policy"]
        for directive in ("default-src 'none'", "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"):
            assert directive in policy
    assert "script-src 'none'" in index.headers["content-security-policy"]
    sources = " ".join(f"'{source}'" for source in hashes)
    assert f"script-src {sources};" in report.headers["content-security-policy"]
    # The old page is served escaped, with the hashes of the same scripts.
    assert legacy.headers["content-security-policy"] == report.headers["content-security-policy"]
    assert PAYLOADS[0] not in legacy.text


@pytest.mark.slow
def test_no_payload_runs_in_chromium_and_the_report_draws(hostile: Hostile) -> None:
    index = browser.load(f"{hostile.base}/drift")
    assert index.errors == []
    assert f'href="/drift/reports/{hostile.report_id}"' in index.dom
    assert not PWNED.search(index.dom)

    for report_id in (hostile.report_id, hostile.legacy_id):
        report = browser.load(f"{hostile.base}/drift/reports/{report_id}", budget_ms=20_000)
        assert report.errors == [], report.console
        assert not PWNED.search(report.dom)
        assert "flywheel-summary" in report.dom
        # Evidently's bundled script ran (its hash is allowed) and drew the dashboard into its root element.
        assert DRAWN.search(report.dom), report.dom[-2000:]

    # The same page unescaped and without the policy: the payloads run, so the checks above could fail.
    raw = browser.load(hostile.raw_html.as_uri(), budget_ms=20_000)
    assert PWNED.search(raw.dom)
