"""The model page in headless chromium, served by ``bentoml serve`` on a home with a real retrain history: what
reviewers read there, what admins change there (promote, roll back) and what nobody else can, and hostile texts
shown as text."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pandas as pd
import pytest

from feedback.store import FeedbackStore
from flywheel.access import AuditLog
from flywheel.broker import EmbeddedBroker
from flywheel.database import Database
from flywheel.deployments import DeploymentStore
from flywheel.label_set import LabelSet
from flywheel.models.deployment import DeploymentCreate, DeploymentMode, DeploymentOutcome
from flywheel.models.labels import LabelCreate
from flywheel.models.retrain import RetrainRunPublic, RunStatus, RunTrigger
from flywheel.registry import ModelRegistry
from flywheel.sessions import SessionSigner, load_secret
from retrain.live_results import deployment_results
from retrain.model_history import LiveResult, load_history
from retrain.models_page import Viewer, index_page
from retrain.runner import RetrainRunner
from tests.conftest import copy_home, run_cli, running_service, settings_from, wait_until
from tests.retrain.conftest import label, trust
from tests.support import product_reviews, three_way

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.slow

#: A label an admin allowed and annotators used: it becomes a class of the retrained models, so their cards, scores
#: per class and the run's records all carry it. It marks the page's root element if it ever runs.
HOSTILE_LABEL = "</td><script>document.documentElement.dataset.pwned1=1</script>"
#: What an admin types as the reason of a promotion: the pointer history shows it.
HOSTILE_REASON = "<img src=x onerror=document.documentElement.dataset.pwned2=2>"
PWNED = "() => Object.keys(document.documentElement.dataset)"


@dataclass
class Served:
    """A served home with three versions: the first champion, and the two candidates of one retrain run."""

    url: str
    env: dict[str, str]
    admin_key: str
    reviewer_key: str
    registry: ModelRegistry
    database: Database
    run: RetrainRunPublic


def create_key(env: dict[str, str], name: str, role: str) -> str:
    created = run_cli(env, "keys", "create", name, "--role", role)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def served(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    env = {
        **copy_home(trained_home, tmp_path_factory.mktemp("models-page") / "home"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "FLYWHEEL_RELOAD_INTERVAL": "0.5",
        "FLYWHEEL_EPOCHS": "6",
        "FLYWHEEL_RETRAIN_MIN_EVAL_ROWS": "8",
        "FLYWHEEL_RETRAIN_MAX_HOLDOUT_DROP": "0.05",
        # Two recipes, so the run records two candidates and the gate judges one of them.
        "FLYWHEEL_RETRAIN_CANDIDATES": "warm,gentle",
    }
    settings = settings_from(env)
    database = Database.from_settings(settings).upgrade()
    registry = ModelRegistry(settings)
    store = FeedbackStore(database, settings)
    LabelSet(database).add(LabelCreate(name=HOSTILE_LABEL), "test-admin")
    neutral = three_way(90, seed=4).query("label == 'neutral'").assign(label=HOSTILE_LABEL)
    trust(store)
    label(store, pd.concat([product_reviews(120, seed=1), neutral], ignore_index=True))
    run = RetrainRunner(settings, database, registry, progress=False).run(RunTrigger.MANUAL)
    assert run is not None and run.status in {RunStatus.PROMOTED, RunStatus.REJECTED}, run
    assert run.challenger_version is not None, run
    admin_key = create_key(env, "ops-admin", "admin")
    reviewer_key = create_key(env, "ops-reviewer", "reviewer")
    try:
        with running_service(env) as url:
            yield Served(url, env, admin_key, reviewer_key, registry, database, run)
    finally:
        database.dispose()


def log_in(page: Page, served: Served, key: str, target: str = "/models") -> None:
    """Log in at /login as a person does, landing on ``target``."""
    page.goto(f"{served.url}/login?next={target}")
    page.fill("#key", key)
    page.click("#login")
    page.wait_for_url(f"{served.url}{target}")


def served_version(served: Served) -> str:
    answer = httpx.get(f"{served.url}/model", headers={"X-API-Key": served.admin_key}, timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["version"])


def session_csrf(page: Page, served: Served) -> str:
    """The CSRF token of the page's session, as a page with a form would carry it."""
    [cookie] = [c for c in page.context.cookies() if c["name"] == "flywheel_session"]
    # The browser keeps the value as sent, in the quotes a cookie value with "=" gets; the server reads it unquoted.
    session = cookie["value"].strip('"')
    return SessionSigner(load_secret(Path(served.env["FLYWHEEL_HOME"]), None)).csrf_token(session)


def test_a_browser_without_a_session_is_sent_to_log_in(served: Served, page: Page) -> None:
    page.goto(f"{served.url}/models")

    assert page.url == f"{served.url}/login?next=/models"
    assert page.locator("#key").is_visible()
    # API clients are told, not redirected: a wrong key is 401, a reviewer's key reads a page that runs no script.
    read = httpx.get(f"{served.url}/models", headers={"X-API-Key": served.reviewer_key}, timeout=30)
    assert read.status_code == 200 and "<h1>Models</h1>" in read.text
    assert read.headers["content-security-policy"].startswith("default-src 'none';")
    assert "script-src" not in read.headers["content-security-policy"]
    wrong = httpx.get(f"{served.url}/models", headers={"X-API-Key": "fw_wrong"}, timeout=30)
    assert wrong.status_code == 401
    path = f"/models/{served.run.champion_version}"
    detail = httpx.get(f"{served.url}{path}", timeout=30)
    assert detail.status_code == 303 and detail.headers["location"] == f"/login?next={path}"


def test_a_reviewer_reads_every_version_its_scores_its_run_and_the_chart(served: Served, page: Page) -> None:
    log_in(page, served, served.reviewer_key)
    versions = served.registry.list()
    champion = served.registry.champion()
    run = served.run
    assert run.candidates is not None and len(versions) == 3

    for entry in versions:
        section = page.locator(f"section#v-{entry.version}")
        per_class = entry.card.holdout_metrics["per_class"]
        rows = section.locator("table.classes tr.class")
        assert rows.count() == len(per_class)
        for i, (name, scores) in enumerate(per_class.items()):
            cells = rows.nth(i).locator("td").all_inner_texts()
            assert cells == [
                name,
                f"{scores['precision']:.4f}",
                f"{scores['recall']:.4f}",
                f"{scores['f1']:.4f}",
                str(scores["support"]),
            ]
        macro = f"{entry.card.holdout_metrics['macro_f1']:.4f}"
        assert section.locator("td.macro-f1").inner_text() == macro
    assert HOSTILE_LABEL in versions[-1].card.labels

    for record in run.candidates:
        section = page.locator(f"section#v-{record['version']}")
        assert section.locator(".decision .reason").inner_text() == run.reason
        assert section.locator(".status").inner_text() == run.status
        row = section.locator(f"tr[data-candidate='{record['name']}']")
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == record["name"] and cells[1] == record["version"]
        assert cells[7] == f"{record['holdout_macro_f1']:.4f}" and cells[8] == f"{record['feedback_macro_f1']:.4f}"
        assert section.locator("tr.candidate").count() == len(run.candidates)
    chosen = page.locator(f"section#v-{run.challenger_version} tr.candidate.this td.gate")
    assert chosen.inner_text() == "chosen for the gate"
    assert "flywheel train" in page.locator(f"section#v-{versions[0].version} p").last.inner_text()

    points = page.locator("#f1-chart circle.version")
    assert points.count() == len(versions)
    assert [points.nth(i).get_attribute("data-version") for i in range(len(versions))] == [v.version for v in versions]
    assert page.locator("#f1-chart circle.champion").get_attribute("data-version") == champion
    assert page.locator("#versions tr.champion").get_attribute("data-version") == champion

    # Read only: no forms that change the champion, and the hostile label is text that never ran.
    assert page.locator("form.promote").count() == 0 and page.locator("#rollback").count() == 0
    assert page.locator("script").count() == 0
    assert page.evaluate(PWNED) == []
    assert HOSTILE_LABEL in page.locator("body").inner_text()


def test_a_reviewer_cannot_change_the_champion(served: Served, page: Page) -> None:
    log_in(page, served, served.reviewer_key)
    champion = served.registry.champion()
    other = next(v.version for v in served.registry.list() if v.version != champion)

    # A forged form post with the reviewer's own session and a valid CSRF token: the role is missing.
    forged = page.request.post(
        f"{served.url}/models/{other}/promote", form={"csrf_token": session_csrf(page, served), "expected": champion}
    )
    assert forged.status == 403 and "ops-reviewer is a reviewer; this needs the admin role" in forged.text()
    by_key = httpx.post(f"{served.url}/models/rollback", headers={"X-API-Key": served.reviewer_key}, timeout=30)
    assert by_key.status_code == 403
    assert served.registry.champion() == champion


def test_a_post_without_a_valid_csrf_token_is_refused(served: Served, page: Page) -> None:
    log_in(page, served, served.admin_key)
    champion = served.registry.champion()
    other = next(v.version for v in served.registry.list() if v.version != champion)

    for form in ({"expected": champion}, {"expected": champion, "csrf_token": "0" * 64}):
        refused = page.request.post(f"{served.url}/models/{other}/promote", form=form)
        assert refused.status == 403 and "CSRF token" in refused.text()
    refused = page.request.post(f"{served.url}/models/rollback", form={"csrf_token": "forged"})
    assert refused.status == 403
    assert served.registry.champion() == champion


def test_an_admin_promotes_a_version_and_rolls_back_from_the_page(served: Served, page: Page) -> None:
    log_in(page, served, served.admin_key)
    before = served.registry.champion()
    assert before is not None and served_version(served) == before
    target = next(v.version for v in reversed(served.registry.list()) if v.version != before)
    form = page.locator(f"form.promote[data-version='{target}']")
    assert page.locator("form.promote").count() == 2, "every version but the champion has a Promote button"

    form.locator("input[name=reason]").fill(HOSTILE_REASON)
    form.locator("button").click()

    page.wait_for_url(re.compile(r"/models\?done=promote"))
    assert served.registry.champion() == target
    assert page.locator("#notice").inner_text().startswith(f"promoted {target} (champion before: {before})")
    latest = page.locator("#pointer-history tr.promote").first
    assert latest.locator("td.reason").inner_text() == f"promoted on the model page by ops-admin: {HOSTILE_REASON}"
    assert page.locator("#f1-chart circle.champion").get_attribute("data-version") == target
    assert page.evaluate(PWNED) == []
    wait_until(lambda: served_version(served) == target, 30, "the service to serve the promoted version")
    [audit] = AuditLog(served.database).recent(1, "model.promote")
    assert (audit.actor, audit.target, audit.detail) == (
        "ops-admin",
        target,
        {"previous": before, "reason": HOSTILE_REASON},
    )

    page.locator("#rollback button").click()

    page.wait_for_url(re.compile(r"/models\?done=rollback"))
    assert served.registry.champion() == before
    assert page.locator("#notice").inner_text().startswith(f"rolled back to {before} (champion before: {target})")
    wait_until(lambda: served_version(served) == before, 30, "the service to serve the restored version")
    [audit] = AuditLog(served.database).recent(1, "model.rollback")
    assert (audit.actor, audit.target, audit.detail["previous"]) == ("ops-admin", before, target)


def test_a_change_from_a_stale_page_is_refused(served: Served, page: Page) -> None:
    log_in(page, served, served.admin_key)
    champion = served.registry.champion()
    other = next(v.version for v in served.registry.list() if v.version != champion)
    stale = {"csrf_token": session_csrf(page, served), "expected": other}

    refused = page.request.post(f"{served.url}/models/{other}/promote", form=stale)

    assert refused.status == 409 and f"the champion changed to {champion}" in refused.text()
    assert served.registry.champion() == champion
    unknown = page.request.post(f"{served.url}/models/nosuchversion/promote", form=stale)
    assert unknown.status == 404 and "not found" in unknown.text()


def test_live_results_of_each_version_are_shown_escaped(served: Served) -> None:
    versions = [v.version for v in served.registry.list()]

    def live(_: Database, shown: Sequence[str]) -> dict[str, list[LiveResult]]:
        assert list(shown) == versions
        return {
            versions[-1]: [LiveResult("shadow " + HOSTILE_REASON, [("agreement", "0.97"), ("note", HOSTILE_LABEL)])]
        }

    history = load_history(served.registry, served.database, live)
    html = index_page(history, Viewer("ops-reviewer", "reviewer", anonymous=False, admin=False), reload_seconds=0.5)

    assert html.count('<table class="live-result">') == 1
    assert "<script" not in html and "<img" not in html
    assert "shadow &lt;img src=x onerror=document.documentElement.dataset.pwned2=2&gt;" in html
    assert "&lt;/td&gt;&lt;script&gt;" in html


def test_a_shadow_phase_and_how_it_ended_are_shown_beside_its_version(served: Served) -> None:
    candidate = next(v.version for v in served.registry.list() if v.version != served.registry.champion())
    store = DeploymentStore(served.database, served.registry)
    store.start(DeploymentCreate(version=candidate, mode="shadow", share=0.2), "ops-admin")
    try:
        active = deployment_results(served.database, [candidate])[candidate]
        assert len(active) == 1 and active[0].title.startswith("shadow on 20% of requests")
        assert "(active)" in active[0].title and ("shadowed requests", "0") in active[0].figures
    finally:
        store.end(candidate, DeploymentMode.SHADOW, DeploymentOutcome.STOPPED, actor="ops-admin", reason="seen enough")

    history = load_history(served.registry, served.database, deployment_results)
    html = index_page(history, Viewer("ops-reviewer", "reviewer", anonymous=False, admin=False), reload_seconds=0.5)
    assert "(stopped by ops-admin)" in html and "seen enough" in html
