"""The drift index page plots each predicted label's share by hour: any number of labels, hostile names inert."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flywheel.database import Database
from flywheel.events import utcnow
from monitoring.dashboard import index_page, share_chart
from monitoring.label_share import HourlyCount, LabelShare, LabelShareCheck
from tests.conftest import app_client, copy_home
from tests.monitoring import browser
from tests.monitoring.test_label_share import store_predictions
from tests.monitoring.test_pages import IMG, SCRIPT, Parsed

#: Runs when the page lets a label name become markup.
PWN = "<img src=x onerror=document.documentElement.dataset.pwned=1>"
END = datetime(2024, 5, 2, 12, 30, tzinfo=UTC)


def text_of(page: str) -> str:
    """The page's text as a browser shows it: runs of white space as one space."""
    return " ".join(Parsed(page).text.split())


def counts(labels: list[str], hours: int) -> list[HourlyCount]:
    """Every label in every hour, the first label's share growing hour by hour."""
    first = END.replace(minute=0) - timedelta(hours=hours - 1)
    rows = []
    for h in range(hours):
        for i, label in enumerate(labels):
            rows.append(HourlyCount(first + timedelta(hours=h), label, 10 + (h * 5 if i == 0 else 0)))
    return rows


def reference(labels: list[str]) -> LabelShareCheck:
    shares = [
        LabelShare(label=label, reference_share=1 / len(labels), current_share=0.0, current_count=0, z_score=0.0,
                   shifted=False)
        for label in labels
    ]  # fmt: skip
    return LabelShareCheck(max_diff=0.15, min_z=4.0, shares=shares)


def test_every_label_is_a_line_of_hourly_shares_with_its_reference() -> None:
    labels = [f"topic {i}" for i in range(8)]

    page = index_page([], total=0, shares=share_chart(counts(labels, 6), END, 6, reference(labels)))

    text = text_of(page)
    assert '<svg id="label-share-chart"' in page
    assert page.count('<g class="label-share">') == 8
    assert page.count('<circle class="hour"') == 8 * 6
    assert page.count('<line class="reference"') == 8
    assert "Each predicted label's share of the 555 predictions stored for the last 6 hours" in text
    assert "topic 0 — 2024-05-02 12:00 UTC: 0.333 (35 of 105 predictions)" in text
    assert "topic 7 (reference 0.125)" in text
    assert "2024-05-02 07:00 UTC" in text
    # The eight lines differ: colours past the palette's ten would repeat with a dash pattern.
    assert len(set(re.findall(r'<polyline points="[^"]+" fill="none" stroke="(#[0-9a-f]{6})"', page))) == 8


def test_hours_without_predictions_break_the_line_and_an_empty_store_says_so() -> None:
    rows = [row for row in counts(["a", "b"], 6) if row.hour.hour not in (9, 10)]

    gap = index_page([], total=0, shares=share_chart(rows, END, 6))
    empty = index_page([], total=0, shares=share_chart([], END, 72))

    assert gap.count("<polyline") == 2 * 2  # each label: 07-08 and 11-12
    assert "no predictions in the last 72 hours" in text_of(empty)


def test_hostile_label_names_are_text() -> None:
    labels = ["ok", SCRIPT, IMG, PWN]

    page = index_page([], total=0, shares=share_chart(counts(labels, 3), END, 3, reference(labels)))

    parsed = Parsed(page)
    assert "script" not in parsed.tags
    assert "img" not in parsed.tags
    for label in labels:
        assert f"{label} (reference 0.250)" in text_of(page)


def test_hostile_label_names_run_nothing_in_chromium(tmp_path: Path) -> None:
    labels = ["ok", PWN, SCRIPT.replace("alert(1)", "document.documentElement.dataset.pwned=2")]
    path = tmp_path / "drift.html"
    path.write_text(index_page([], total=0, shares=share_chart(counts(labels, 3), END, 3)), encoding="utf-8")

    page = browser.load(path.as_uri(), budget_ms=1000)

    assert "data-pwned" not in page.dom
    assert 'id="label-share-chart"' in page.dom
    assert page.dom.count('class="label-share"') == 3


def test_the_drift_page_plots_the_stored_predictions(trained_home: dict[str, str], tmp_path: Path) -> None:
    env = copy_home(trained_home, tmp_path / "home")
    database = Database(f"sqlite:///{Path(env['FLYWHEEL_HOME']) / 'flywheel.db'}")
    now = utcnow()
    try:
        store_predictions(
            database,
            [(f"text {i}", ["billing", "delivery", "quality"][i % 3], now - timedelta(hours=i % 5)) for i in range(60)]
            + [("too old for the chart", "ancient", now - timedelta(hours=80))],
        )
    finally:
        database.dispose()

    with app_client(env) as client:
        answer = client.get("/drift")
        narrow = client.get("/drift", params={"hours": 2})
        wrong = client.get("/drift", params={"hours": 0})

    assert answer.status_code == 200
    assert "script-src 'none'" in answer.headers["content-security-policy"]
    text = text_of(answer.text)
    assert answer.text.count('<g class="label-share">') == 3
    assert "60 predictions stored for the last 72 hours" in text
    assert "ancient" not in text
    assert "24 predictions stored for the last 2 hours" in text_of(narrow.text)
    assert wrong.status_code == 422
