"""An offline English thesaurus: synonyms from the WordNet 3.0 database that Debian's ``wordnet-base`` installs.

The files are read directly in WordNet's own documented format (wndb(5WN)): each ``index.<pos>`` line lists a
lemma's synsets most frequent sense first, and each ``data.<pos>`` line at a synset's byte offset lists its words
and pointers. A word's synonyms are the other words of its most frequent sense (rarer senses mostly mean something
else in a review: ``good`` as a commodity, ``bad`` as in a bad cold) and, for an adjective, the words of the
adjectives WordNet lists as similar to it (``bad``: awful, lousy, mediocre, ...): those keep a review's polarity,
while the head adjective's own sense often has no other word.
NLTK's WordNet reader is not used: since 3.9 it refuses directories outside its own data paths, it needs a
``lexnames`` file Debian does not ship, and it loads NLTK's downloadable WordNet to map versions, which no run here
may download.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import cache
from pathlib import Path

from flywheel.errors import TrainingError

logger = logging.getLogger(__name__)

#: Where Debian's ``wordnet-base`` puts the WordNet 3.0 database.
DEFAULT_THESAURUS_PATH = Path("/usr/share/wordnet")
POS_FILES = ("noun", "verb", "adj", "adv")
#: WordNet's pointer from a head adjective to the adjectives similar to it (its satellites).
SIMILAR_TO = "&"
#: Adjective words carry syntactic markers, e.g. ``ready_to_hand(p)``.
_MARKER = re.compile(r"\([a-z]+\)$")


class ThesaurusError(TrainingError):
    """The thesaurus synonym augmentation needs is not installed or cannot be read."""


class Thesaurus:
    """Synonyms of single English words from a WordNet 3.0 database directory."""

    def __init__(self, root: Path) -> None:
        missing = [name for pos in POS_FILES for name in (f"index.{pos}", f"data.{pos}") if not (root / name).is_file()]
        if missing:
            raise ThesaurusError(
                f"no WordNet database at {root} (missing {', '.join(missing)}): synonym and insert augmentation need "
                "it; install Debian's wordnet-base (`apt-get install wordnet-base`, which `make install` does) or set "
                "FLYWHEEL_THESAURUS_PATH to a WordNet 3.0 dict directory"
            )
        self.root = root
        # lemma -> (tagged senses, (pos, offset) of its most frequent sense) in its part of speech with most usage.
        self._senses: dict[str, tuple[int, tuple[str, int]]] = {}
        for pos in POS_FILES:
            self._read_index(pos)
        self._lock = threading.Lock()
        self._data = {pos: (root / f"data.{pos}").open("rb") for pos in POS_FILES}
        self._cache: dict[str, list[str]] = {}
        logger.info("thesaurus: %d words from %s", len(self._senses), root)

    def _read_index(self, pos: str) -> None:
        with (self.root / f"index.{pos}").open(encoding="utf-8") as lines:
            for line in lines:
                if line.startswith(" "):  # the licence header
                    continue
                fields = line.split()
                lemma, synsets, pointers = fields[0], int(fields[2]), int(fields[3])
                tagged = int(fields[5 + pointers])
                # The part of speech whose senses were seen most often in WordNet's tagged corpus is the word's
                # usual one ("boring" the adjective, not the drilling).
                if synsets and (lemma not in self._senses or tagged > self._senses[lemma][0]):
                    self._senses[lemma] = (tagged, (pos, int(fields[6 + pointers])))

    def synonyms(self, word: str) -> list[str]:
        """Other words for ``word`` (lowercase, spaces between words), most frequent sense first; [] if none."""
        key = word.lower()
        if key in self._cache:
            return self._cache[key]
        found: list[str] = []
        if key in self._senses:
            pos, offset = self._senses[key][1]
            words, similar = self._synset(pos, offset)
            for other in similar:
                words += self._synset(pos, other)[0]
            for lemma in words:
                text = lemma.replace("_", " ")
                # Proper nouns and numbers are not synonyms of a common word.
                if text != key and text not in found and text.islower() and not any(c.isdigit() for c in text):
                    found.append(text)
        self._cache[key] = found
        return found

    def _synset(self, pos: str, offset: int) -> tuple[list[str], list[int]]:
        """The words of the synset at ``offset`` and the offsets of the adjectives similar to it."""
        with self._lock:
            handle = self._data[pos]
            handle.seek(offset)
            fields = handle.readline().decode("utf-8").split()
        count = int(fields[3], 16)
        words = [_MARKER.sub("", fields[4 + 2 * i]) for i in range(count)]
        start = 5 + 2 * count
        pointers = [fields[start + 4 * i : start + 4 * i + 4] for i in range(int(fields[4 + 2 * count]))]
        similar = [int(off) for symbol, off, _, _ in pointers if symbol == SIMILAR_TO and fields[2] == "a"]
        return words, similar


@cache
def load_thesaurus(root: Path = DEFAULT_THESAURUS_PATH) -> Thesaurus:
    """The thesaurus of ``root``, read once per process (its indexes take about a second)."""
    return Thesaurus(root)
