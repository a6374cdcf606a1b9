"""Principals and roles over the in-process app: every role × route pair, keys from the CLI, revocation, the audit
log, local mode without keys, and the refusal to serve an open address without keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flywheel.broker import EmbeddedBroker
from tests.conftest import app_client, copy_home, run_cli, wait_until

pytestmark = pytest.mark.slow

ROLES = ("client", "annotator", "reviewer", "admin")
#: (method, path, body, least role that may call it)
ROUTES = [
    ("POST", "/predict", {"text": "a lovely film"}, "client"),
    ("GET", "/model", None, "client"),
    ("POST", "/feedback", {"text": "a lovely film", "label": "positive"}, "client"),
    ("GET", "/review", None, "annotator"),
    ("GET", "/drift", None, "reviewer"),
    ("GET", "/drift/reports", None, "reviewer"),
    ("GET", "/drift/targets", None, "reviewer"),
    ("GET", "/retrain/runs", None, "reviewer"),
    ("POST", "/retrain", None, "admin"),
]
PUBLIC = ["/readyz", "/docs", "/openapi.json"]


@pytest.fixture()
def home(trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path: Path) -> dict[str, str]:
    return {**copy_home(trained_home, tmp_path / "home"), "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}


def create_key(env: dict[str, str], name: str, role: str) -> str:
    created = run_cli(env, "keys", "create", name, "--role", role)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture()
def keyed(home: dict[str, str]) -> Iterator[tuple[TestClient, dict[str, str], dict[str, str]]]:
    keys = {role: create_key(home, f"{role}-1", role) for role in ROLES}
    with app_client(home) as http:
        yield http, keys, home


def call(http: TestClient, method: str, path: str, body: object, key: str | None) -> int:
    headers = {"X-API-Key": key} if key is not None else {}
    return http.request(method, path, json=body, headers=headers).status_code


def test_every_role_and_route(keyed: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    http, keys, _ = keyed
    for method, path, body, least in ROUTES:
        assert call(http, method, path, body, None) == 401, (path, "no key")
        assert call(http, method, path, body, "fw_not-a-real-key") == 401, (path, "wrong key")
        for role in ROLES:
            status = call(http, method, path, body, keys[role])
            if ROLES.index(role) < ROLES.index(least):
                assert status == 403, (path, role, status)
            else:
                assert status not in (401, 403), (path, role, status)
                assert status < 500, (path, role, status)
    for path in PUBLIC:
        assert http.get(path).status_code == 200, path


def test_own_feedback_only_unless_reviewer(keyed: tuple[TestClient, dict[str, str], dict[str, str]]) -> None:
    http, keys, _ = keyed
    mine = http.post(
        "/feedback", json={"text": "a calm film", "label": "positive"}, headers={"X-API-Key": keys["client"]}
    )
    assert mine.status_code == 202, mine.text
    feedback_id = mine.json()["feedback_id"]
    path = f"/feedback/{feedback_id}"
    assert http.get(path, headers={"X-API-Key": keys["client"]}).status_code == 200
    other = create_key(keyed[2], "client-2", "client")
    wait_until(lambda: http.get("/model", headers={"X-API-Key": other}).status_code == 200, what="the new key")
    assert http.get(path, headers={"X-API-Key": other}).status_code == 404, "another client sees nothing"
    assert http.get(path, headers={"X-API-Key": keys["reviewer"]}).status_code == 200


def test_keys_are_listed_revoked_rotated_and_audited(
    keyed: tuple[TestClient, dict[str, str], dict[str, str]],
) -> None:
    http, keys, env = keyed
    listing = run_cli(env, "keys", "list")
    assert all(f"{role}-1" in listing.stdout for role in ROLES)
    assert all(key not in listing.stdout for key in keys.values()), "keys are never shown again"

    # Rotation: a new key for the client, then the old one revoked; services refuse it within seconds.
    fresh = create_key(env, "client-1b", "client")
    assert run_cli(env, "keys", "revoke", "client-1").returncode == 0
    wait_until(lambda: call(http, "GET", "/model", None, keys["client"]) == 401, what="the revocation")
    assert call(http, "GET", "/model", None, fresh) == 200
    assert "revoked" in run_cli(env, "keys", "list").stdout

    again = run_cli(env, "keys", "create", "admin-1", "--role", "admin")
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = run_cli(env, "keys", "create", "x", "--role", "root")
    assert bad.returncode == 2 and "unknown role 'root'" in bad.stderr

    audit = run_cli(env, "audit", "--limit", "20")
    assert "key.create" in audit.stdout and "key.revoke" in audit.stdout and "client-1" in audit.stdout
    assert all(key not in audit.stdout for key in (*keys.values(), fresh))


def test_without_keys_local_callers_are_clients_with_reviewer_reads(home: dict[str, str]) -> None:
    with app_client(home) as http:
        assert http.post("/predict", json={"text": "a lovely film"}).status_code == 200
        assert http.get("/drift").status_code == 200
        assert http.get("/review").status_code == 200
        refused = http.post("/retrain")
        assert refused.status_code == 401 and "flywheel keys create" in refused.json()["detail"]
        # The first key switches every protected route to key-required, without a restart.
        key = create_key(home, "ops", "admin")
        wait_until(lambda: http.post("/predict", json={"text": "x"}).status_code == 401, what="key-required mode")
        assert http.post("/predict", json={"text": "x"}, headers={"X-API-Key": key}).status_code == 200


def test_admin_token_is_a_bootstrap_admin_but_does_not_require_keys(home: dict[str, str]) -> None:
    env = {**home, "FLYWHEEL_ADMIN_TOKEN": "bootstrap-secret-token"}
    with app_client(env) as http:
        assert http.post("/predict", json={"text": "still open"}).status_code == 200
        assert http.post("/retrain", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/retrain", headers={"Authorization": "Bearer bootstrap-secret-token"}).status_code == 202


def test_serving_an_open_address_without_keys_refuses_to_start(home: dict[str, str]) -> None:
    flywheel = shutil.which("flywheel") or str(Path(sys.executable).parent / "flywheel")
    started = time.monotonic()
    result = subprocess.run(
        [flywheel, "serve", "--host", "0.0.0.0", "--port", "1"],
        env={**os.environ, **home},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: refusing to serve on 0.0.0.0 with no API keys")
    assert "flywheel keys create" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def csrf_of(page: str) -> str:
    marker = 'name="csrf_token" value="'
    return page.split(marker, 1)[1].split('"', 1)[0]


def test_browser_login_exchanges_a_key_for_a_strict_cookie(
    keyed: tuple[TestClient, dict[str, str], dict[str, str]],
) -> None:
    http, keys, env = keyed
    assert http.get("/drift").status_code == 401
    form = http.get("/login?next=/drift")
    assert form.status_code == 200 and form.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
    token = csrf_of(form.text)

    forged = http.post("/login", data={"key": keys["reviewer"], "csrf_token": "forged", "next": "/drift"})
    assert forged.status_code == 403
    wrong = http.post("/login", data={"key": "fw_wrong", "csrf_token": token, "next": "/drift"})
    assert wrong.status_code == 401 and "wrong or revoked" in wrong.text
    token = csrf_of(wrong.text)
    away = http.post(
        "/login", data={"key": keys["reviewer"], "csrf_token": token, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert away.status_code == 303 and away.headers["location"] == "/drift", "no open redirect"
    cookie = away.headers["set-cookie"]
    assert "flywheel_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert keys["reviewer"] not in cookie

    assert http.get("/drift").status_code == 200, "the session cookie authenticates pages"
    # A state-changing request riding on the cookie needs the page's CSRF token.
    assert http.post("/feedback", json={"text": "t", "label": "positive"}).status_code == 403
    session = http.cookies["flywheel_session"]
    page_token = csrf_of(http.get("/login").text)
    sent = http.post("/feedback", json={"text": "t", "label": "positive"}, headers={"X-CSRF-Token": page_token})
    assert sent.status_code == 202, sent.text

    assert run_cli(env, "keys", "revoke", "reviewer-1").returncode == 0
    wait_until(lambda: http.get("/drift").status_code == 401, what="revocation to end the session")
    assert session  # the cookie is still sent; it no longer names an active principal
