"""Text normalisation shared by every package: what counts as the same text is decided here, once.

Stored keys (``Prediction.text_key``, ``Feedback.text_key``) are digests of :func:`dedupe_key`, so changing
these rules invalidates stored keys: do it only with a migration that recomputes them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_CONTROL = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b-\u200d\ufeff]")
_SPACE = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Unicode NFKC, no control or zero-width characters, single spaces, stripped."""
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub("", text)
    return _SPACE.sub(" ", text).strip()


def dedupe_key(text: str) -> str:
    """Key under which texts count as the same: case, punctuation and spacing ignored."""
    return _SPACE.sub(" ", _NON_WORD.sub(" ", normalize_text(text).casefold())).strip()


def text_key(value: str) -> str:
    """Digest under which two texts count as the same (case, punctuation and spacing ignored)."""
    return hashlib.sha1(dedupe_key(value).encode(), usedforsecurity=False).hexdigest()
