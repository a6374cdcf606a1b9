"""Shadow challengers: a sample of live requests is also scored by another version in the same worker, logged as
shadow predictions and stored apart, never returned; `flywheel models compare` and ``shadow_comparison`` report it
against the served model.

The challenger is the tiny champion with its label head swapped: it disagrees on every text with the champion's
own confidence, so agreement, confidence shift, label shares and accuracy are all known exactly.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from flywheel.access import AuditLog
from flywheel.broker import EmbeddedBroker
from flywheel.comparison import shadow_comparison
from flywheel.events import EventDecodeError, PredictionEvent, Shadowed, Topic, decode, encode
from flywheel.models.deployment import DeploymentOutcome
from monitoring.window import WindowReader
from tests.conftest import read_topic, run_cli, wait_until
from tests.service.challengers import ADMIN, Stack, challenger_stack, register_swapped
from tests.support import synthetic_sentiment

OTHER = {"positive": "negative", "negative": "positive"}


@pytest.fixture(scope="module")
def stack(
    trained_home: dict[str, str], broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with challenger_stack(trained_home, broker, tmp_path_factory.mktemp("shadow")) as running:
        running.store.set_source("anonymous", trusted=True)
        yield running


@pytest.fixture(scope="module")
def swapped(stack: Stack) -> str:
    return register_swapped(stack.registry)


def shadowing(stack: Stack, deployment_id: str) -> None:
    """Wait until the worker scores requests with the shadow of ``deployment_id`` (it follows within a poll)."""

    def seen() -> bool:
        ids = [str(p["prediction_id"]) for p in stack.predict(["a great film", "an awful film"])]
        time.sleep(0.3)
        return any(row.deployment_id == deployment_id for row in stack.shadows(ids).values())

    wait_until(seen, what="the shadow to score requests")


def start(stack: Stack, version: str, sample: str) -> str:
    result = run_cli(stack.env, "models", "shadow", version, "--sample", sample)
    assert result.returncode == 0, result.stderr
    assert f"shadow of {version} on {float(sample):.0%} of requests" in result.stdout
    active = stack.client.get("/challengers").json()[0]
    assert active["version"] == version and active["ended_at"] is None
    return str(active["deployment_id"])


def test_answers_are_unchanged_and_shadow_predictions_are_stored_apart(stack: Stack, swapped: str) -> None:
    champion = stack.registry.champion()
    texts = synthetic_sentiment(24, seed=5)["text"].tolist()
    before = stack.predict(texts)

    deployment_id = start(stack, swapped, "1.0")
    shadowing(stack, deployment_id)
    after = stack.predict(texts)

    # The caller sees exactly what it saw without a shadow: the champion's labels and scores.
    assert [(p["label"], p["scores"], p["model_version"]) for p in after] == [
        (p["label"], p["scores"], champion) for p in before
    ]
    ids = [str(p["prediction_id"]) for p in after]
    live = stack.wait_stored(ids)
    wait_until(lambda: len(stack.shadows(ids)) == len(ids), what="shadow predictions ingested")
    shadows = stack.shadows(ids)
    for answer in after:
        shadow = shadows[str(answer["prediction_id"])]
        assert (shadow.model_version, shadow.deployment_id) == (swapped, deployment_id)
        assert (shadow.served_version, shadow.served_label) == (champion, answer["label"])
        assert shadow.label == OTHER[str(answer["label"])]
        assert shadow.confidence == pytest.approx(answer["confidence"], abs=1e-5)
    # Live traffic only, everywhere live traffic is read: the prediction table, drift windows, the review queue.
    assert {row.model_version for row in live.values()} == {champion}
    # (The ingestor also stores what other tests on this broker logged: only these requests are judged.)
    window = WindowReader(stack.database).load(hours=1, max_rows=10_000).frame
    ours = window[window["prediction_id"].isin(ids)]
    assert len(ours) == len(ids) and set(ours["model_version"]) == {champion} and window["prediction_id"].is_unique
    review = stack.client.get("/review", params={"limit": 500}).json()
    assert review and not {item["model_version"] for item in review} & {swapped}
    # On Kafka: marked as shadow, with the served answer and no text, so no older reader takes it for live traffic.
    events = read_topic(
        stack.env["FLYWHEEL_KAFKA_BOOTSTRAP"],
        Topic.PREDICTIONS.value,
        lambda seen: (
            sum(isinstance(e, PredictionEvent) and e.shadow is not None and e.prediction_id in ids for e in seen)
            >= len(ids)
        ),
    )
    marked = [e for e in events if isinstance(e, PredictionEvent) and e.prediction_id in ids and e.shadow]
    assert len(marked) == len(ids)
    assert all(e.schema_version == 2 and e.text is None and e.model_version == swapped for e in marked)


def test_compare_reports_agreement_shares_and_accuracy_on_feedback(stack: Stack, swapped: str) -> None:
    deployment_id = start(stack, swapped, "1.0")
    shadowing(stack, deployment_id)
    frame = synthetic_sentiment(40, seed=9)
    answers = stack.predict(frame["text"].tolist())
    ids = [str(p["prediction_id"]) for p in answers]
    stack.wait_stored(ids)
    wait_until(lambda: len(stack.shadows(ids)) == len(ids), what="shadow predictions ingested")
    # People label half of the shadowed requests with their true label.
    for answer, truth in list(zip(answers, frame["label"], strict=True))[:20]:
        response = stack.client.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": truth})
        assert response.status_code == 202, response.text

    result = run_cli(stack.env, "models", "compare", swapped, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)

    rows = figures["rows"]
    assert figures["deployment"]["deployment_id"] == deployment_id
    assert rows >= len(ids) and figures["agreed"] == 0 and figures["agreement"] == 0.0
    assert figures["confidence_shift"] == pytest.approx(0.0, abs=1e-4)
    shares = {share["label"]: share for share in figures["labels"]}
    for label, share in shares.items():
        assert share["challenger"] == shares[OTHER[label]]["served"]
    correct = sum(a["label"] == truth for a, truth in list(zip(answers, frame["label"], strict=True))[:20])
    feedback = figures["feedback"]
    assert feedback["labelled"] == 20
    assert (feedback["served_correct"], feedback["challenger_correct"]) == (correct, 20 - correct)
    assert feedback["served_accuracy"] == pytest.approx(correct / 20)
    # What the model page calls gives the same figures.
    direct = shadow_comparison(stack.database, swapped)
    assert (direct.rows, direct.agreed, direct.feedback.labelled) == (rows, 0, 20)

    table = run_cli(stack.env, "models", "compare", swapped)
    assert table.returncode == 0, table.stderr
    assert f"rows: {rows} shadowed requests" in table.stdout
    assert f"agreement with the served label: 0.0% (0/{rows})" in table.stdout
    assert "label shares" in table.stdout and "on 20 requests people labelled" in table.stdout
    assert f"{correct / 20:.1%}" in table.stdout and f"{(20 - correct) / 20:.1%}" in table.stdout


def test_a_sampled_shadow_scores_its_share_and_the_admin_api_stops_it(stack: Stack, swapped: str) -> None:
    assert stack.client.post(f"/models/{swapped}/shadow", json={"sample": 0.2}).status_code == 401
    response = stack.client.post(f"/models/{swapped}/shadow", json={"sample": 0.2}, headers=ADMIN)
    assert response.status_code == 201, response.text
    deployment = response.json()
    assert (deployment["mode"], deployment["share"], deployment["started_by"]) == ("shadow", 0.2, "admin-token")
    shadowing(stack, deployment["deployment_id"])

    answers = [stack.predict([text])[0] for text in synthetic_sentiment(100, seed=13)["text"]]
    ids = [str(answer["prediction_id"]) for answer in answers]
    stack.wait_stored(ids)
    time.sleep(1.0)
    sampled = len(stack.shadows(ids))
    # 100 requests at 0.2: 20 expected, a standard deviation of 4.
    assert 6 <= sampled <= 40, sampled

    stopped = stack.client.request("DELETE", f"/models/{swapped}/shadow", headers=ADMIN)
    assert stopped.status_code == 200, stopped.text
    ended = stopped.json()
    assert ended["outcome"] == DeploymentOutcome.STOPPED and ended["ended_by"] == "admin-token"
    assert ended["evidence"]["rows"] >= sampled
    assert stack.client.request("DELETE", f"/models/{swapped}/shadow", headers=ADMIN).status_code == 409
    time.sleep(1.5)  # three polls of the deployment table
    later = [str(p["prediction_id"]) for p in stack.predict(synthetic_sentiment(10, seed=17)["text"].tolist())]
    stack.wait_stored(later)
    time.sleep(1.0)
    assert stack.shadows(later) == {}
    listed = run_cli(stack.env, "models", "challengers")
    assert listed.returncode == 0 and "stopped" in listed.stdout and swapped in listed.stdout
    actions = Counter(entry.action for entry in AuditLog(stack.database).recent(500))
    assert actions["model.shadow"] >= 3 and actions["model.shadow.stopped"] == 1
    assert actions["model.shadow.replaced"] >= 2


def test_a_shadow_of_the_champion_or_an_unknown_version_is_refused(stack: Stack) -> None:
    champion = stack.registry.champion()
    refused = run_cli(stack.env, "models", "shadow", str(champion))
    assert refused.returncode == 2 and f"{champion} is the champion already" in refused.stderr
    unknown = run_cli(stack.env, "models", "shadow", "no-such-version")
    assert unknown.returncode == 2 and "model version 'no-such-version' not found" in unknown.stderr
    bad = run_cli(stack.env, "models", "shadow", str(champion), "--sample", "1.5")
    assert bad.returncode == 2 and "--sample must be above 0 and at most 1" in bad.stderr
    never = run_cli(stack.env, "models", "compare", "no-such-version")
    assert never.returncode == 2 and "was never a challenger" in never.stderr


def test_version_one_events_read_as_live_and_a_shadow_event_carries_no_text() -> None:
    live = {
        "prediction_id": "p1",
        "model_version": "v1",
        "label": "positive",
        "confidence": 0.9,
        "scores": {"positive": 0.9, "negative": 0.1},
        "latency_ms": 2.0,
    }
    old = decode(Topic.PREDICTIONS, json.dumps({**live, "schema_version": 1, "text": "a film"}).encode())
    assert isinstance(old, PredictionEvent) and old.shadow is None and old.text == "a film"
    with pytest.raises(EventDecodeError, match="a live prediction needs its text"):
        decode(Topic.PREDICTIONS, json.dumps(live).encode())
    shadowed = Shadowed(deployment_id="d1", served_version="v0", served_label="negative", served_confidence=0.8)
    shadow = PredictionEvent(**live, shadow=shadowed)
    # Null text: a reader from before version 2 (text required) dead-letters it instead of storing it as traffic.
    assert json.loads(encode(shadow))["text"] is None and decode(Topic.PREDICTIONS, encode(shadow)) == shadow
    with pytest.raises(EventDecodeError, match="carries no text"):
        decode(Topic.PREDICTIONS, json.dumps({**live, "text": "a film", "shadow": shadowed.model_dump()}).encode())
