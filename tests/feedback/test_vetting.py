"""Vetting untrusted feedback: label-error scores, trusted sources, conflicts, quarantine, rate limits."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from feedback.prediction_rows import prediction_row
from feedback.ratelimit import RateLimiter
from feedback.stats import feedback_stats
from feedback.store import FeedbackStore
from feedback.vetting import Vetter
from flywheel.events import utcnow
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


def test_trusted_sources_are_accepted_even_against_a_confident_model(store: FeedbackStore) -> None:
    event = prediction("what a masterpiece", 0.99)
    store.ingest([prediction_row(event, utcnow())])
    trusted = store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative", source="annotation"))
    assert trusted.status == FeedbackStatus.ACCEPTED
    assert trusted.label_issue  # still scored and visible


def test_conflicting_labels_for_one_text_are_flagged_and_held(store: FeedbackStore) -> None:
    first, second = prediction("The ending...", 0.5), prediction("the ending", 0.52)
    store.ingest([prediction_row(first, utcnow()), prediction_row(second, utcnow())])
    web = store.submit(FeedbackCreate(prediction_id=first.prediction_id, label="negative", source="web"))
    assert web.status == FeedbackStatus.ACCEPTED and not web.conflict

    mobile = store.submit(FeedbackCreate(prediction_id=second.prediction_id, label="positive", source="mobile"))
    assert mobile.conflict and mobile.status == FeedbackStatus.PENDING
    assert "conflicting labels" in (mobile.status_reason or "")
    web_now = store.get(web.feedback_id)
    assert web_now.conflict and web_now.status == FeedbackStatus.PENDING
    assert feedback_stats(store.database, store.vetter).conflicts == 2

    # The second source changes its mind: the texts agree again and the flags clear.
    settled = store.submit(FeedbackCreate(prediction_id=second.prediction_id, label="negative", source="mobile"))
    assert not settled.conflict and settled.status == FeedbackStatus.ACCEPTED
    assert not store.get(web.feedback_id).conflict


def test_a_source_that_keeps_contradicting_a_confident_model_is_quarantined(
    store_factory: Callable[..., FeedbackStore],
) -> None:
    store = store_factory(feedback_quarantine_min_scored=10, feedback_quarantine_rate=0.3, feedback_quarantine_ratio=3)
    now = utcnow()
    honest = [prediction(f"honest text {i}", 0.55) for i in range(20)]
    spam = [prediction(f"spam target {i}", 0.97 if i % 3 else 0.6) for i in range(12)]
    store.ingest([prediction_row(event, now) for event in honest + spam])
    for event in honest:
        store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative", source="web"))
    early = store.submit(FeedbackCreate(prediction_id=spam[0].prediction_id, label="negative", source="bot"))
    assert early.status == FeedbackStatus.ACCEPTED  # model was unsure there: plausible correction
    for event in spam[1:]:
        store.submit(FeedbackCreate(prediction_id=event.prediction_id, label="negative", source="bot"))

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


def test_rate_limiter_allows_a_burst_then_paces_each_source() -> None:
    limiter = RateLimiter(per_minute=3)
    assert [limiter.acquire("web", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("web", now=0.0) == pytest.approx(20.0)
    assert limiter.acquire("mobile", now=0.0) == 0.0
    assert limiter.acquire("web", now=20.0) == 0.0
    assert RateLimiter(per_minute=0).acquire("web") == 0.0
