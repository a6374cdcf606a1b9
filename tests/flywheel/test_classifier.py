"""How the classifier batches texts into forward passes: the answers never depend on it."""

from __future__ import annotations

import itertools

import numpy as np

from flywheel.classifier import plan_passes
from flywheel.registry import ModelRegistry
from flywheel.runtime import load_classifier
from tests.conftest import settings_from


def test_passes_cover_every_text_once_within_the_row_limit() -> None:
    lengths = sorted([5, 6, 6, 7, 30, 31, 33, 90, 91, 128] * 5)
    bounds = plan_passes(lengths, max_rows=8)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths)
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(bounds))
    assert all(0 < end - start <= 8 for start, end in bounds)


def test_passes_are_cut_where_lengths_jump_and_equal_lengths_share_one() -> None:
    short, long = [8] * 10, [120] * 10
    assert plan_passes(short + long, max_rows=32) == [(0, 10), (10, 20)]
    assert plan_passes([40] * 20, max_rows=32) == [(0, 20)]
    assert plan_passes([], max_rows=16) == []


def test_answers_do_not_depend_on_the_batch_or_the_order(trained_home: dict[str, str]) -> None:
    settings = settings_from(trained_home)
    classifier = load_classifier(ModelRegistry(settings).champion_version(), settings)
    texts = ["great", "a truly wonderful, moving film " * 3, "bad", "dull and far too long " * 20, "ok fine"] * 4
    together = classifier.predict_proba(texts, batch_size=16)
    alone = [classifier.predict_proba([text], batch_size=1) for text in texts]
    np.testing.assert_allclose(together.probs, np.vstack([one.probs for one in alone]), atol=1e-5)
    assert together.truncated == [one.truncated[0] for one in alone]
    assert together.truncated[3] and not together.truncated[0]
    reversed_ = classifier.predict_proba(texts[::-1], batch_size=3)
    np.testing.assert_allclose(reversed_.probs[::-1], together.probs, atol=1e-5)
    embedded = classifier.embed(texts, batch_size=16)
    np.testing.assert_allclose(embedded[1], classifier.embed([texts[1]])[0], atol=1e-5)
