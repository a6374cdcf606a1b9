"""Label-preserving augmentation of a training split: EDA word edits and back-translation, minority classes topped up.

The word edits are those of EDA (Wei and Zou, 2019): replace words by synonyms from an offline thesaurus, insert a
synonym of a word, swap two words, delete words; each changes about ``rate`` of a text's words. Every new row copies
its source row (label, weight and any other column) with only the text changed, is normalised like the cleaned data,
and is never the same text (as ``dedupe_key`` sees it) as an existing row or one of the rows it must stay apart from
(validation, holdout): a copy would leak what checkpoints and the gate are judged on. Everything is seeded: the same
rows and settings make the same new rows.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
from pydantic import BaseModel, Field
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from flywheel.settings import Settings
from flywheel.text import dedupe_key, normalize_text
from retrain.thesaurus import DEFAULT_THESAURUS_PATH, Thesaurus, load_thesaurus

if TYPE_CHECKING:
    from flywheel.settings.training import AugmentOperation

logger = logging.getLogger(__name__)

WORD_EDITS = ("synonym", "insert", "swap", "delete")
BACK_TRANSLATION = "back_translation"
#: Most new rows drawn from one source row: past that a topped-up class is near-copies of a few texts.
MAX_VARIANTS_PER_ROW = 8
EXAMPLES_PER_OPERATION = 3
#: Words whose removal, move or replacement can reverse what a text says ("not good", "fine but dull"): no edit
#: touches them. Every word ending in n't counts too.
PROTECTED = frozenset(
    {"no", "not", "nor", "never", "none", "nobody", "nothing", "neither", "nowhere", "without", "cannot", "hardly",
     "barely", "scarcely", "but", "however", "although", "though", "yet", "except", "instead", "rather"}
)
_WORD = re.compile(r"^(\W*)([A-Za-z][A-Za-z'-]*)(\W*)$")


class Example(BaseModel):
    """One augmented row beside the row it came from."""

    operation: str
    label: str
    source: str
    text: str


class AugmentationReport(BaseModel):
    """What augmentation added to a training split; part of the data-quality report."""

    operations: list[str]
    rows_in: int
    rows_added: int = 0
    #: New rows by operation, then by label.
    added: dict[str, dict[str, int]] = Field(default_factory=dict)
    #: New rows planned for a label but not made: its texts gave no new text (too short, no synonyms, only copies).
    shortfall: dict[str, int] = Field(default_factory=dict)
    #: Training rows per label after augmentation.
    class_balance: dict[str, int] = Field(default_factory=dict)
    examples: list[Example] = Field(default_factory=list)

    def render(self) -> str:
        """Human-readable summary for the CLI."""
        lines = [f"augmentation ({', '.join(self.operations)}): {self.rows_added} rows added to {self.rows_in}"]
        for operation, labels in self.added.items():
            counts = ", ".join(f"{label}={count}" for label, count in labels.items())
            lines.append(f"  {operation:<16} {counts}")
        if any(self.shortfall.values()):
            short = ", ".join(f"{label}={count}" for label, count in self.shortfall.items() if count)
            lines.append(f"  not made (no new text to be had): {short}")
        balance = ", ".join(f"{label}={count}" for label, count in self.class_balance.items())
        lines.append(f"  classes after augmentation: {balance}")
        lines.extend(f"  e.g. {e.operation}: {e.source[:70]!r} -> {e.text[:70]!r}" for e in self.examples[:4])
        return "\n".join(lines)


@dataclass
class WordEdits:
    """EDA's four edits on whitespace-separated words, punctuation and capitals kept around each word."""

    thesaurus: Thesaurus | None
    rate: float

    def __call__(self, operation: str, text: str, rng: random.Random) -> str | None:
        """The edited text, or None when this edit cannot change ``text``."""
        tokens = text.split()
        count = max(1, round(self.rate * len(tokens)))
        if operation == "swap":
            return self._swap(tokens, count, rng)
        if operation == "delete":
            return self._delete(tokens, rng)
        candidates = [(i, word, synonyms) for i, word in self._words(tokens) if (synonyms := self._synonyms(word))]
        if not candidates:
            return None
        if operation == "synonym":
            for i, word, synonyms in rng.sample(candidates, min(count, len(candidates))):
                prefix, _, suffix = _parts(tokens[i])
                tokens[i] = prefix + _cased(rng.choice(synonyms), word) + suffix
        else:
            for _ in range(count):
                _, _, synonyms = rng.choice(candidates)
                tokens.insert(rng.randint(0, len(tokens)), rng.choice(synonyms))
        return " ".join(tokens)

    def _synonyms(self, word: str) -> list[str]:
        if self.thesaurus is None or word.lower() in ENGLISH_STOP_WORDS:
            return []
        return self.thesaurus.synonyms(word)

    @staticmethod
    def _words(tokens: Sequence[str]) -> list[tuple[int, str]]:
        """Positions and bare words of the tokens a synonym may replace or be drawn from: no initials, and no
        capitalised word inside a sentence, which is a name ("Night Shyamalan" is no dark one)."""
        found = []
        for i, token in enumerate(tokens):
            word = _parts(token)[1]
            sentence_start = i == 0 or tokens[i - 1][-1:] in ".!?"
            if len(word) > 2 and not _protected(word) and (sentence_start or not word[0].isupper()):
                found.append((i, word))
        return found

    def _swap(self, tokens: list[str], count: int, rng: random.Random) -> str | None:
        movable = _movable(tokens)
        if len(movable) < 2:
            return None
        for _ in range(count):
            a, b = rng.sample(movable, 2)
            tokens[a], tokens[b] = tokens[b], tokens[a]
        return " ".join(tokens)

    def _delete(self, tokens: list[str], rng: random.Random) -> str | None:
        removable = _movable(tokens)
        if len(tokens) < 2 or not removable:
            return None
        dropped = {i for i in removable if rng.random() < self.rate} or {rng.choice(removable)}
        if len(dropped) == len(tokens):
            dropped.discard(rng.choice(sorted(dropped)))
        return " ".join(token for i, token in enumerate(tokens) if i not in dropped)


def _parts(token: str) -> tuple[str, str, str]:
    """Leading punctuation, the word, trailing punctuation; the word is empty for a token that is no word."""
    match = _WORD.match(token)
    return (match.group(1), match.group(2), match.group(3)) if match else ("", "", "")


def _movable(tokens: Sequence[str]) -> list[int]:
    """Positions of the words a swap or a deletion may touch (punctuation stays where it is)."""
    return [i for i, token in enumerate(tokens) if (word := _parts(token)[1]) and not _protected(word)]


def _protected(word: str) -> bool:
    lower = word.lower()
    return lower in PROTECTED or lower.endswith("n't")


def _cased(replacement: str, original: str) -> str:
    """``replacement`` written with ``original``'s capitals (Great -> Outstanding, BAD -> AWFUL)."""
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    return replacement[:1].upper() + replacement[1:] if original[:1].isupper() else replacement


class Augmenter:
    """Adds augmented rows to a training split; ``apply`` returns the grown split and its report."""

    def __init__(
        self,
        operations: Sequence[AugmentOperation],
        *,
        multiplier: float = 1.0,
        class_multipliers: dict[str, float] | None = None,
        balance: bool = True,
        rate: float = 0.1,
        seed: int = 0,
        thesaurus: Thesaurus | None = None,
        translate: Callable[[Sequence[str]], list[str]] | None = None,
        max_text_chars: int = 5000,
    ) -> None:
        self.operations = list(dict.fromkeys(operations))
        self.multiplier = multiplier
        self.class_multipliers = class_multipliers or {}
        self.balance = balance
        self.seed = seed
        self.translate = translate
        self.max_text_chars = max_text_chars
        if {"synonym", "insert"} & set(self.operations) and thesaurus is None:
            thesaurus = load_thesaurus(DEFAULT_THESAURUS_PATH)
        if BACK_TRANSLATION in self.operations and translate is None:
            raise ValueError("back_translation needs a translate function (a retrain.translation.BackTranslator)")
        self.edits = WordEdits(thesaurus, rate)

    @classmethod
    def from_settings(cls, settings: Settings) -> Augmenter | None:
        """The augmenter ``settings.augment`` asks for, with its thesaurus and translation models; None for none."""
        if not settings.augment:
            return None
        thesaurus = None
        if {"synonym", "insert"} & set(settings.augment):
            thesaurus = load_thesaurus(settings.thesaurus_path or DEFAULT_THESAURUS_PATH)
        translate = None
        if BACK_TRANSLATION in settings.augment:
            from retrain.translation import BackTranslator

            forward, back = settings.back_translation_models
            translate = BackTranslator(forward, back, max_length=settings.max_length, seed=settings.seed)
        return cls(
            settings.augment,
            multiplier=settings.augment_multiplier,
            class_multipliers=settings.augment_class_multipliers,
            balance=settings.augment_balance,
            rate=settings.augment_rate,
            seed=settings.seed,
            thesaurus=thesaurus,
            translate=translate,
            max_text_chars=settings.max_text_chars,
        )

    def plan(self, counts: dict[str, int]) -> dict[str, int]:
        """New rows per label from its source rows' count: its multiplier's share, then (with ``balance``) enough
        to reach the largest class's count after its own; at most ``MAX_VARIANTS_PER_ROW`` per source row."""
        wanted = {label: round(n * self.class_multipliers.get(label, self.multiplier)) for label, n in counts.items()}
        if self.balance and counts:
            top = max(counts[label] + wanted[label] for label in counts)
            wanted = {label: max(wanted[label], top - n) for label, n in counts.items()}
        return {label: min(wanted[label], MAX_VARIANTS_PER_ROW * counts[label]) for label in counts}

    def apply(
        self, train: pd.DataFrame, *, exclude: Iterable[str] = (), eligible: pd.Series | None = None
    ) -> tuple[pd.DataFrame, AugmentationReport]:
        """``train`` with augmented rows appended (columns ``augmentation``: the operation, and ``augmented_from``:
        the source text; both None on original rows). Only ``eligible`` rows are sources (default all); no new text
        equals a text of ``train`` or of ``exclude``."""
        sources = train if eligible is None else train[eligible.to_numpy(dtype=bool)]
        taken = set(train["text"].map(dedupe_key)) | {dedupe_key(text) for text in exclude}
        counts = {str(label): int(n) for label, n in sources["label"].value_counts().sort_index().items()}
        plan = self.plan(counts)
        report = AugmentationReport(operations=self.operations, rows_in=len(train))
        ordered = {label: sources[sources["label"] == label].sample(frac=1.0, random_state=self.seed) for label in plan}
        # Each class starts where the previous one left the operations' rotation, so small classes use all of them.
        starts, start = {}, 0
        for label, rows in ordered.items():
            starts[label], start = start, start + len(rows)
        state = _State(taken, self._back_translations(ordered, plan, starts), [], report)
        for label, wanted in plan.items():
            report.shortfall[label] = wanted - self._augment_class(ordered[label], wanted, starts[label], state)
        added = pd.DataFrame(state.rows).reset_index(drop=True) if state.rows else train.iloc[:0].copy()
        out = pd.concat(
            [
                train.assign(augmentation=None, augmented_from=None),
                added.reindex(columns=[*train.columns, "augmentation", "augmented_from"]),
            ],
            ignore_index=True,
        )
        report.rows_added = len(added)
        report.class_balance = {str(k): int(v) for k, v in out["label"].value_counts().sort_index().items()}
        logger.info(
            "augmentation: %d rows added to %d (%s)",
            len(added),
            len(train),
            ", ".join(f"{op} {sum(labels.values())}" for op, labels in report.added.items()) or "none",
        )
        return out, report

    def _augment_class(self, rows: pd.DataFrame, wanted: int, start: int, state: _State) -> int:
        """Cycle over the class's rows, one operation per row and pass, until ``wanted`` new texts are made."""
        made = 0
        for round_ in range(MAX_VARIANTS_PER_ROW):
            for position, (_, row) in enumerate(rows.iterrows()):
                if made >= wanted:
                    return made
                operation = self._operation(start + position + round_)
                # A model's translation of a text is one paraphrase: its second pass would be the same text.
                if operation == BACK_TRANSLATION and round_:
                    continue
                text = self._variant(operation, str(row["text"]), round_, state)
                if text is not None:
                    state.add(row, text, operation)
                    made += 1
        return made

    def _variant(self, operation: str, text: str, round_: int, state: _State) -> str | None:
        """A new text from ``text`` by ``operation``, or None when a few draws give none that is new."""
        if operation == BACK_TRANSLATION:
            candidates = [state.translated.get(text, "")]
        else:
            # Seeded by the text and the pass, not by row order: a row makes the same variants in any split.
            rng = random.Random(f"{self.seed}:{operation}:{round_}:{text}")
            candidates = [self.edits(operation, text, rng) or "" for _ in range(3)]
        for candidate in map(normalize_text, candidates):
            if candidate and len(candidate) <= self.max_text_chars and dedupe_key(candidate) not in state.taken:
                return candidate
        return None

    def _operation(self, turn: int) -> str:
        return self.operations[turn % len(self.operations)]

    def _back_translations(
        self, ordered: dict[str, pd.DataFrame], plan: dict[str, int], starts: dict[str, int]
    ) -> dict[str, str]:
        """Round trips of the texts the first pass gives to back-translation, in batches."""
        if BACK_TRANSLATION not in self.operations or self.translate is None:
            return {}
        texts: list[str] = []
        for label, wanted in plan.items():
            first_pass = ordered[label]["text"].astype(str).tolist()[:wanted]
            texts.extend(t for i, t in enumerate(first_pass) if self._operation(starts[label] + i) == BACK_TRANSLATION)
        return dict(zip(texts, self.translate(texts), strict=True)) if texts else {}


@dataclass
class _State:
    """One ``apply``: the texts no new row may repeat, back-translations, the new rows and their report."""

    taken: set[str]
    translated: dict[str, str]
    rows: list[pd.Series]
    report: AugmentationReport

    def add(self, row: pd.Series, text: str, operation: str) -> None:
        """A copy of ``row`` carrying ``text``, counted and perhaps kept as an example."""
        self.taken.add(dedupe_key(text))
        new = row.copy()
        new["augmented_from"], new["text"], new["augmentation"] = row["text"], text, operation
        self.rows.append(new)
        label = str(row["label"])
        per_label = self.report.added.setdefault(operation, {})
        per_label[label] = per_label.get(label, 0) + 1
        if sum(e.operation == operation for e in self.report.examples) < EXAMPLES_PER_OPERATION:
            self.report.examples.append(Example(operation=operation, label=label, source=str(row["text"]), text=text))
