"""Classification metrics on a labeled set: accuracy, per-class P/R/F1, macro-F1, confusion matrix, bootstrap
intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from flywheel.classifier import Classifier


class ClassMetrics(BaseModel):
    """Precision, recall and F1 of one label."""

    precision: float
    recall: float
    f1: float
    support: int


class Metrics(BaseModel):
    """Scores of one model on one labeled set."""

    rows: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    labels: list[str]
    confusion_matrix: list[list[int]]

    def table(self, title: str = "evaluation") -> Table:
        """A rich table for the CLI."""
        table = Table(title=f"{title}: accuracy {self.accuracy:.4f}, macro-F1 {self.macro_f1:.4f}, n={self.rows}")
        for column in ("label", "precision", "recall", "f1", "support"):
            table.add_column(column, justify="left" if column == "label" else "right")
        for label, m in self.per_class.items():
            table.add_row(label, f"{m.precision:.4f}", f"{m.recall:.4f}", f"{m.f1:.4f}", str(m.support))
        return table

    def render(self, title: str = "evaluation") -> str:
        """The table as plain text."""
        console = Console(width=100, record=True, file=None)
        with console.capture() as capture:
            console.print(self.table(title))
        return capture.get()


def score(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> Metrics:
    """Metrics of predictions against the truth over a fixed label order."""
    labels = list(labels)
    # Macro-F1 over the labels that occur, as scikit-learn's default does: a class the set has no row of and that
    # was never predicted (a label added after the holdout was frozen) would otherwise count as an F1 of 0.
    seen = set(y_true) | set(y_pred)
    occurring = [label for label in labels if label in seen] or labels
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return Metrics(
        rows=len(y_true),
        accuracy=round(float(accuracy_score(y_true, y_pred)), 6),
        macro_f1=round(float(f1_score(y_true, y_pred, labels=occurring, average="macro", zero_division=0)), 6),
        per_class={
            label: ClassMetrics(
                precision=round(float(p), 6), recall=round(float(r), 6), f1=round(float(f), 6), support=int(s)
            )
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        labels=labels,
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    )


def evaluate(classifier: Classifier, frame: pd.DataFrame, batch_size: int = 64) -> Metrics:
    """Run ``classifier`` over a ``text``/``label`` frame and score it."""
    predicted = predictions(classifier, frame["text"].tolist(), batch_size=batch_size)
    return score(frame["label"].tolist(), predicted, classifier.labels)


def predictions(classifier: Classifier, texts: Sequence[str], batch_size: int = 64) -> list[str]:
    """The label ``classifier`` gives each text."""
    probs = classifier.predict_proba(list(texts), batch_size=batch_size).probs
    return [classifier.labels[i] for i in probs.argmax(axis=1)]


def _class_f1_rows(truth: np.ndarray, predicted: np.ndarray, n_labels: int, rows: np.ndarray) -> np.ndarray:
    """Each label's F1 in every bootstrap sample at once: ``rows`` is (samples, n) indices into the set; the result
    is (samples, labels)."""
    t, p = truth[rows], predicted[rows]
    f1 = np.zeros((rows.shape[0], n_labels))
    for label in range(n_labels):
        tp = ((t == label) & (p == label)).sum(1)
        fp = ((t != label) & (p == label)).sum(1)
        fn = ((t == label) & (p != label)).sum(1)
        denominator = 2 * tp + fp + fn
        f1[:, label] = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    return f1


def bootstrap_macro_f1(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    *,
    baseline: Sequence[str] | None = None,
    confidence: float = 0.95,
    samples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of macro-F1, or of its difference over ``baseline`` predictions on the same rows.

    The difference is paired: both sets of predictions are scored on each resample of the rows, so what the two
    models get right together cancels out and the interval is as narrow as the set allows.
    """
    ours, *theirs = _class_f1_samples(y_true, [y_pred, *([baseline] if baseline is not None else [])], labels,
                                      samples, seed)
    values = ours.mean(1) - (theirs[0].mean(1) if theirs else 0.0)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_change_highs(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    baseline: Sequence[str],
    labels: Sequence[str],
    *,
    confidence: float,
    samples: int = 2000,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """Upper ends of the paired-bootstrap intervals of ``y_pred``'s change over ``baseline`` on the same rows: of
    macro-F1 (over ``labels``) and of each label's F1. Below zero, the predictions are surely worse there."""
    ours, theirs = _class_f1_samples(y_true, [y_pred, baseline], labels, samples, seed)
    change = ours - theirs
    top = 100 - (1 - confidence) / 2 * 100
    macro = float(np.percentile(change.mean(1), top))
    return macro, {label: float(np.percentile(change[:, i], top)) for i, label in enumerate(labels)}


def _class_f1_samples(
    y_true: Sequence[str], predicted: list[Sequence[str]], labels: Sequence[str], samples: int, seed: int
) -> list[np.ndarray]:
    """Each set of ``predicted`` labels' per-label F1 on the same bootstrap resamples of the rows (paired)."""
    index = {label: i for i, label in enumerate(labels)}
    truth = np.array([index[label] for label in y_true])
    rows = np.random.default_rng(seed).integers(0, len(truth), size=(samples, len(truth)))
    return [_class_f1_rows(truth, np.array([index.get(label, -1) for label in each]), len(index), rows)
            for each in predicted]
