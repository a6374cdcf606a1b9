"""``flywheel up`` as a newcomer runs it: everything starts, the loop turns, crashes heal, SIGTERM cleans up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, run_cli
from tests.support import product_reviews

pytestmark = pytest.mark.slow
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: it only waits to be reaped by its parent.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def family(pid: int) -> list[int]:
    """A process and all its descendants (BentoML workers leave their parent's process group)."""
    import psutil

    root = psutil.Process(pid)
    return [root.pid, *(child.pid for child in root.children(recursive=True))]


@pytest.fixture()
def stack(tiny_base: Path, synthetic_csv: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    port = free_port()
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "BENTOML_"))},
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_BASE_MODEL": str(tiny_base),
        "FLYWHEEL_EPOCHS": "6",
        "FLYWHEEL_MIN_TRAIN_STEPS": "1",
        "FLYWHEEL_RETRAIN_CANDIDATES": "warm",
        "FLYWHEEL_LEARNING_RATE": "0.002",
        "FLYWHEEL_BATCH_SIZE": "16",
        "FLYWHEEL_MAX_LENGTH": "32",
        "FLYWHEEL_TORCH_THREADS": "1",
        "FLYWHEEL_RELOAD_INTERVAL": "0.5",
        "FLYWHEEL_FEEDBACK_RATE_LIMIT": "0",
        "FLYWHEEL_RETRAIN_MIN_EVAL_ROWS": "8",
        "FLYWHEEL_RETRAIN_MAX_HOLDOUT_DROP": "0.05",
        # The worker would retrain on its own at 100 new labels; this test drives `retrain now` itself.
        "FLYWHEEL_RETRAIN_MIN_NEW_LABELS": "100000",
    }
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(
        [FLYWHEEL, "up", "--port", str(port), "--broker-port", str(free_port()), "--data", str(synthetic_csv)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while b"Flywheel is up" not in (tmp_path / "up.log").read_bytes():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield url, env, home
    finally:
        # A graceful stop lets the supervisor reap its components; SIGKILL only if that hangs.
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def components(home: Path) -> dict[str, int]:
    return dict(json.loads((home / "run" / "up.json").read_text())["components"])


def test_up_runs_the_loop_heals_crashes_and_stops_cleanly(stack: tuple[str, dict[str, str], Path]) -> None:
    url, env, home = stack
    pids = components(home)
    assert set(pids) == {"broker", "service", "ingest", "worker"}
    with httpx.Client(base_url=url, timeout=30) as http:
        # The README's walk-through right after `up` says it is up: every step works on the first try.
        walk = http.post("/predict", json={"text": "a great film"})
        assert walk.status_code == 200, walk.text
        prediction_id = walk.json()["predictions"][0]["prediction_id"]
        fixed = http.post("/feedback", json={"prediction_id": prediction_id, "label": "negative", "comment": "sarcasm"})
        assert fixed.status_code == 202, fixed.text
        review = http.get("/review", params={"limit": 5})
        assert review.status_code == 200, review.text
        first = http.get("/model").json()["version"]

        # Crashed components come back and the loop keeps working through them; a killed server's orphaned
        # workers must not keep its port.
        for name in ("ingest", "service"):
            os.kill(pids[name], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while any(components(home)[name] == pids[name] for name in ("ingest", "service")):
            assert time.monotonic() < deadline, "components were not restarted"
            time.sleep(0.5)
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the restarted service did not become ready"
            time.sleep(0.5)

        corrections = product_reviews(160, seed=1)
        predictions = http.post("/predict", json={"texts": corrections["text"].tolist()}).json()["predictions"]
        # Keyless callers are the one principal `anonymous`; a local user trusts it to skip vetting.
        assert run_cli(env, "sources", "trust", "anonymous").returncode == 0
        for prediction, truth in zip(predictions, corrections["label"], strict=True):
            body = {"prediction_id": prediction["prediction_id"], "label": truth, "source": "annotation"}
            assert http.post("/feedback", json=body).status_code == 202
        deadline = time.monotonic() + 90
        while True:
            export = run_cli(env, "feedback", "export").stdout
            if export.count(",accepted") >= 160:
                break
            assert time.monotonic() < deadline, export[-1000:]
            time.sleep(1)
        retrain = run_cli(env, "retrain", "now")
        assert ": promoted" in retrain.stdout, retrain.stdout + retrain.stderr
        deadline = time.monotonic() + 30
        while http.get("/model").json()["version"] == first:
            assert time.monotonic() < deadline, "the new champion was not served"
            time.sleep(0.5)

    up_pid = json.loads((home / "run" / "up.json").read_text())["supervisor"]
    everything = components(home)
    groups = {name: family(pid) for name, pid in everything.items()}
    assert all(groups.values()), groups
    os.kill(up_pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while alive(up_pid):
        assert time.monotonic() < deadline, "flywheel up did not stop"
        time.sleep(0.5)
    left = {name: [p for p in members if alive(p)] for name, members in groups.items()}
    assert not any(left.values()), f"processes left behind: {left}"
