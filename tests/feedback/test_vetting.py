"""Vetting untrusted feedback: label-error scores, trust granted to sources, conflicts, quarantine, rate limits."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from feedback.prediction_rows import prediction_row
from feedback.ratelimit import RateLimiter
from feedback.stats import feedback_stats
from feedback.store import FeedbackStore
from feedback.vetting import Vetter
from flywheel.access import AuditLog
from flywheel.events import utcnow
from flywheel.models.access import Role
from flywheel.models.feedback import FeedbackCreate, FeedbackStatus
from flywheel.settings import Settings
from tests.feedback.conftest import prediction


def test_label_quality_follows_the_models_probabilities() -> None:
    vetter = Vetter(Settings.model_validate({"feedback_label_issue_threshold": 0.1}))
    confident = {"negative": 0.04, "positive": 0.96}
    against = vetter.score("negative", confident)
    assert against.label_issue and against.label_quality == pytest.approx(0.04)
    assert (against.model_label, against.model_confidence) == ("positive", 0.96)
    agreeing = vetter.score("positive", confident)
    assert not agreeing.label_issue and agreeing.label_quality == pytest.approx(0.96)
    unsure = vetter.score("negative", {"negative": 0.45, "positive": 0.55})
    assert not unsure.label_issue
    assert vetter.score("neutral", confident).label_issue


def test_only_sources_trusted_by_an_operator_skip_vetting_and_a_claimed_name_grants_nothing(
    store: FeedbackStore,
) -> None:
    event, later = prediction("what a masterpiece", 0.99), prediction("a true masterpiece", 0.99)
    store.ingest([prediction_row(event, utcnow()), prediction_row(later, utcnow())])
    claimed = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative", source="annotation"))
    assert (claimed.source, claimed.note) == ("anonymous", "annotation")
    assert claimed.status == FeedbackStatus.PENDING and "possible label error" in (claimed.status_reason or "")

    early = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="annotation")
    assert early.status == FeedbackStatus.PENDING
    assert store.set_source("annotation", trusted=True, actor="ops").trusted
    # Trusting a source re-vets its open labels at once.
    assert store.get(early.feedback_id).status == FeedbackStatus.ACCEPTED
    trusted = store.submit(FeedbackCreate(prediction_id=later.prediction_id, label="negative"), principal="annotation")
    assert trusted.status == FeedbackStatus.ACCEPTED
    assert trusted.label_issue  # still scored and visible
    assert store.get(claimed.feedback_id).status == FeedbackStatus.PENDING
    assert [(e.actor, e.action, e.target) for e in AuditLog(store.database).recent()] == [
        ("ops", "source.trust", "annotation")
    ]


def test_conflicting_labels_for_one_text_are_flagged_and_held(store: FeedbackStore) -> None:
    first, second = prediction("The ending...", 0.5), prediction("the ending", 0.52)
    store.ingest([prediction_row(first, utcnow()), prediction_row(second, utcnow())])
    web = store.submit(FeedbackCreate(prediction_id=first.prediction_id, label="negative"), principal="web")
    assert web.status == FeedbackStatus.ACCEPTED and not web.conflict

    mobile = store.submit(FeedbackCreate(prediction_id=second.prediction_id, label="positive"), principal="mobile")
    assert mobile.conflict and mobile.status == FeedbackStatus.PENDING
    assert "conflicting labels" in (mobile.status_reason or "")
    web_now = store.get(web.feedback_id)
    assert web_now.conflict and web_now.status == FeedbackStatus.PENDING
    assert feedback_stats(store.database, store.vetter).conflicts == 2

    # The second source changes its mind: the texts agree again and the flags clear.
    settled = store.submit(FeedbackCreate(prediction_id=second.prediction_id, label="negative"), principal="mobile")
    assert not settled.conflict and settled.status == FeedbackStatus.ACCEPTED
    assert not store.get(web.feedback_id).conflict


def test_a_source_that_keeps_contradicting_a_confident_model_is_quarantined(
    store_factory: Callable[..., FeedbackStore],
) -> None:
    store = store_factory(feedback_quarantine_min_scored=10, feedback_quarantine_rate=0.3)
    now = utcnow()
    honest = [prediction(f"honest text {i}", 0.55) for i in range(20)]
    spam = [prediction(f"spam target {i}", 0.97 if i % 3 else 0.6) for i in range(12)]
    store.ingest([prediction_row(event, now) for event in honest + spam])
    for event in honest:
        store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="web")
    early = store.submit(FeedbackCreate(prediction_id=spam[0].prediction_id, label="negative"), principal="bot")
    assert early.status == FeedbackStatus.ACCEPTED  # model was unsure there: plausible correction
    for event in spam[1:]:
        store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative"), principal="bot")

    sources = {source.source: source for source in store.sources()}
    assert sources["bot"].quarantined
    assert "contradict a confident model" in (sources["bot"].quarantine_reason or "")
    assert sources["bot"].reliability < sources["web"].reliability
    assert not sources["web"].quarantined
    # Everything the bot said, even what was accepted before, now waits for review.
    assert store.get(early.feedback_id).status == FeedbackStatus.PENDING
    stats = feedback_stats(store.database, store.vetter)
    bot = next(source for source in stats.sources if source.source == "bot")
    assert bot.quarantined and bot.by_status == {"pending": 12}

    released = store.set_source("bot", quarantined=False)
    assert not released.quarantined
    assert [(e.actor, e.action, e.target) for e in AuditLog(store.database).recent()] == [
        ("cli", "source.release", "bot"),
        ("vetting", "source.quarantine", "bot"),
    ]


def test_a_quarantine_found_while_vetting_a_batch_sends_that_batchs_accepted_labels_back_too(
    store_factory: Callable[..., FeedbackStore],
) -> None:
    store = store_factory(feedback_quarantine_min_scored=10, feedback_quarantine_rate=0.5)
    # Bare-text labels wait for evidence; `flywheel feedback vet` then judges them all in one transaction. The
    # attacker's first labels look plausible and are accepted before its rate crosses the line.
    plausible = [(f"plausible text {i}", "negative") for i in range(4)]
    flips = [(f"clearly positive text {i}", "negative") for i in range(12)]
    store.import_labels(plausible + flips, source="attacker")
    waiting = dict(store.awaiting_evidence())
    assert len(waiting) == 16
    scores = {
        feedback_id: {"negative": 0.45, "positive": 0.55} if text.startswith("plausible") else
        {"negative": 0.03, "positive": 0.97}
        for feedback_id, text in waiting.items()
    }
    assert store.attach_evidence("v1", scores) == 16

    assert next(source for source in store.sources() if source.source == "attacker").quarantined
    statuses = {row.text: row.status for row in store.export()}
    assert set(statuses.values()) == {FeedbackStatus.PENDING}, statuses


def test_rate_limits_count_per_principal_in_one_minute_windows_by_role(
    store_factory: Callable[..., FeedbackStore],
) -> None:
    store = store_factory(feedback_rate_limit=3, feedback_rate_limit_annotator=5)
    limiter = RateLimiter(store.database, store.settings)
    start = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    at = start + timedelta(seconds=15)
    assert [limiter.acquire("web", Role.CLIENT, now=at) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("web", Role.CLIENT, now=at) == pytest.approx(45.0)
    assert limiter.acquire("mobile", Role.CLIENT, now=at) == 0.0
    assert limiter.acquire("web", Role.CLIENT, now=start + timedelta(minutes=1)) == 0.0
    assert [limiter.acquire("ann", Role.ANNOTATOR, now=at) for _ in range(6)][-2:] == [0.0, pytest.approx(45.0)]
    assert all(limiter.acquire("rita", Role.REVIEWER, now=at) == 0.0 for _ in range(10))
    assert RateLimiter(store.database, store_factory(feedback_rate_limit=0).settings).limit(Role.CLIENT) == 0

    # Housekeeping forgets the windows that no longer limit anything.
    assert store.forget_rate_windows(now=start + timedelta(minutes=1, seconds=5)) == 3
    assert store.forget_rate_windows(now=start + timedelta(minutes=1, seconds=5)) == 0
