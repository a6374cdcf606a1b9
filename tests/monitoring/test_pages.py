"""The drift pages escape every stored value: hostile report fields come out as text, never as markup."""

from __future__ import annotations

from datetime import timedelta
from html.parser import HTMLParser

from flywheel.events import new_id, utcnow
from flywheel.models.drift import DriftReportPublic
from monitoring.dashboard import index_page
from monitoring.drift import Signal
from monitoring.performance import PerformanceEstimate
from monitoring.reports import DriftSummary, standalone_page, with_summary

SCRIPT = "</script><script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
HOSTILE = SCRIPT + IMG


class Parsed(HTMLParser):
    """The start tags, attribute values and text of a page, as a browser's tokenizer sees them."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.text = ""
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend(value or "" for _, value in attrs)

    def handle_data(self, data: str) -> None:
        self.text += data


def hostile_report(hours_ago: int, verdict: str, drift_score: float | None) -> DriftReportPublic:
    return DriftReportPublic(
        report_id=new_id() + HOSTILE,
        created_at=utcnow() - timedelta(hours=hours_ago),
        verdict=verdict,
        model_version="v1" + IMG,  # the column holds at most 64 characters
        window_rule="last 24 hours",
        current_rows=300,
        reference_rows=500,
        drift_score=drift_score,
        fired=["text_content" + SCRIPT, "embeddings" + IMG],
        message="shifted" + HOSTILE,
    )


def test_index_page_escapes_report_fields() -> None:
    reports = [hostile_report(1, "drifted" + HOSTILE, 0.5), hostile_report(5, "insufficient_data", None)]

    page = index_page(reports, total=7)

    assert "<script" not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<svg id="drift-chart"' in page
    assert '<table id="runs">' in page
    assert "Showing the newest 2 of 7 runs" in page
    parsed = Parsed(page)
    assert "script" not in parsed.tags
    assert "img" not in parsed.tags
    assert parsed.tags.count("tr") == 1 + len(reports)
    assert parsed.tags.count("circle") == len(reports)
    # The values survive as text (a browser shows them as typed) and as the exact link targets.
    assert "shifted" + HOSTILE in parsed.text
    assert "v1" + IMG in parsed.text
    assert f"text_content{SCRIPT}, embeddings{IMG}" in parsed.text
    assert f"/drift/reports/{reports[0].report_id}" in parsed.attributes
    assert f"run drifted{HOSTILE}" in parsed.attributes


def test_index_page_without_runs() -> None:
    page = index_page([], total=0)

    assert '<svg id="drift-chart"' in page
    assert "no runs yet" in page
    assert "No drift report yet" in page


def hostile_summary() -> DriftSummary:
    now = utcnow()
    return DriftSummary(
        report_id=new_id() + HOSTILE,
        verdict="drifted",
        model_version="v1" + HOSTILE,
        window_start=now - timedelta(hours=24),
        window_end=now,
        window_rule="last 24 hours" + HOSTILE,
        current_rows=300,
        reference_rows=500,
        min_rows=200,
        drift_score=0.5,
        min_signals=2,
        fired=["text_content"],
        signals=[
            Signal(
                name="text_content" + HOSTILE,
                kind="text",
                column="text",
                method="classifier" + HOSTILE,
                threshold=0.55,
                score=0.71,
                drifted=True,
            ),
            Signal(
                name="feedback.label",
                kind="feedback",
                column="label",
                method="chi-square",
                threshold=0.05,
                skipped="too few labels" + HOSTILE,
            ),
        ],
        performance=PerformanceEstimate(rows=300, method="CBPE" + HOSTILE, note="biased low" + HOSTILE),
        targeted=["a", "b"],
        message="two signals fired" + HOSTILE,
    )


def test_summary_escapes_its_fields_inside_evidently_html() -> None:
    summary = hostile_summary()
    evidently = '<html><head><script>var x = 1;</script></head><body class="v"><div id="root"></div></body></html>'

    page = with_summary(evidently, summary)

    # Evidently's own script stays; none comes from the summary.
    assert page.count("<script") == 1
    assert "<img" not in page
    _, block = page.split('<body class="v">')
    assert block.startswith('<section id="flywheel-summary"')
    assert block.endswith('</section><div id="root"></div></body></html>')
    parsed = Parsed(block)
    assert parsed.tags.count("tr") == 1 + len(summary.signals)
    hostile = [summary.report_id, summary.model_version, summary.window_rule, summary.message]
    for value in [*hostile, "classifier" + HOSTILE, "too few labels" + HOSTILE, "biased low" + HOSTILE]:
        assert value in parsed.text
    assert "2 requests most unlike the reference" in parsed.text


def test_standalone_page_escapes_the_title() -> None:
    summary = hostile_summary()

    page = standalone_page(summary)

    assert "<script" not in page
    assert "<img" not in page
    assert page.startswith("<!DOCTYPE html>")
    parsed = Parsed(page)
    assert "section" in parsed.tags
    assert f"Drift report {summary.report_id}" in parsed.text
