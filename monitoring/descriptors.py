"""Text descriptors compared between reference and current texts: size, vocabulary and character mix."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import pandas as pd
from evidently.core.datasets import DatasetColumn, Descriptor
from evidently.descriptors import CustomColumnDescriptor, NonLetterCharacterPercentage, TextLength, WordCount
from evidently.legacy.core import ColumnType

_WORD = re.compile(r"[^\W\d_]+")
#: Whole-word markers of SentencePiece and byte-level BPE vocabularies.
_WORD_PREFIXES = ("", "▁", "Ġ")

#: Descriptor column names, in report order.
LENGTH = "length"
WORDS = "word_count"
OOV = "oov_share"
NON_LETTER = "non_letter_share"
UPPER = "upper_share"
NAMES = (LENGTH, WORDS, OOV, NON_LETTER, UPPER)


class VocabularyShare:
    """Per text, the percentage of words that are not whole tokens of the model's vocabulary."""

    def __init__(self, vocabulary: Iterable[str], lowercase: bool) -> None:
        self.vocabulary = frozenset(vocabulary)
        self.lowercase = lowercase

    def _known(self, word: str) -> bool:
        word = word.lower() if self.lowercase else word
        return any(prefix + word in self.vocabulary for prefix in _WORD_PREFIXES)

    def __call__(self, text: str) -> float:
        words = _WORD.findall(text)
        if not words:
            return 0.0
        return 100.0 * sum(not self._known(w) for w in words) / len(words)


def upper_share(text: str) -> float:
    """Percentage of letters that are uppercase."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return 100.0 * sum(c.isupper() for c in letters) / len(letters)


def _numeric(func: Callable[[str], float]) -> Callable[[DatasetColumn], DatasetColumn]:
    def apply(column: DatasetColumn) -> DatasetColumn:
        values = pd.Series([func(str(v)) for v in column.data], index=column.data.index, dtype="float64")
        return DatasetColumn(type=ColumnType.Numerical, data=values)

    apply.__name__ = getattr(func, "__name__", type(func).__name__)
    return apply


def text_descriptors(column: str, vocabulary: VocabularyShare) -> list[Descriptor]:
    """Evidently descriptors of ``column``, named as in ``NAMES``."""
    return [
        TextLength(column, alias=LENGTH),
        WordCount(column, alias=WORDS),
        CustomColumnDescriptor(column, _numeric(vocabulary), alias=OOV),
        NonLetterCharacterPercentage(column, alias=NON_LETTER),
        CustomColumnDescriptor(column, _numeric(upper_share), alias=UPPER),
    ]
