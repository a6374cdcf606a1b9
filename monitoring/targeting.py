"""Drift-targeted labeling: which current requests a domain classifier finds least like the reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline


def unlike_reference(reference_texts: list[str], current: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    """The ``limit`` current rows (``prediction_id``, ``text``) most confidently told apart from the reference.

    Every current row is scored out-of-fold, so a row's own text never trains the classifier that scores it.
    Returns those rows with a ``drift_score`` column (probability of "current"), highest first.
    """
    if limit <= 0 or current.empty:
        return current.head(0).assign(drift_score=pd.Series(dtype=float))
    texts = [*reference_texts, *current["text"].astype(str)]
    target = np.r_[np.zeros(len(reference_texts), dtype=int), np.ones(len(current), dtype=int)]
    # Case is kept: shouting or a change of casing conventions is a shift worth labeling too.
    classifier = make_pipeline(
        TfidfVectorizer(sublinear_tf=True, lowercase=False, ngram_range=(1, 2), max_features=100_000),
        LogisticRegression(max_iter=1000, class_weight="balanced"),
    )
    folds = StratifiedKFold(n_splits=min(3, int(target.sum()), len(reference_texts)), shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier, texts, target, cv=folds, method="predict_proba")[:, 1]
    ranked = current.assign(drift_score=scores[len(reference_texts) :])
    return ranked.sort_values("drift_score", ascending=False, kind="stable").head(limit)
