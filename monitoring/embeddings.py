"""Embeddings of a drift report: the window's from the store, the reference's from a per-encoder text cache.

Both sides come from the one drift encoder (``flywheel.encoder``). Reference texts are embedded once per encoder,
whichever model version's reference they belong to: a retrained champion's training data mostly repeat the old
one's, so a promotion embeds only its new texts. The cache lives under ``<home>/monitoring/embeddings/<encoder>``
as float16 rows keyed by a digest of the exact text (not ``text_key``, which ignores case and punctuation that a
cased encoder would see).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flywheel.encoder import STORED_DTYPE, DriftEncoder, from_bytes
from flywheel.storage import atomic_write, file_lock

logger = logging.getLogger(__name__)

KEYS_FILE = "keys.npy"
VECTORS_FILE = "vectors.npy"
#: Hex digits of the text digest each cached row is keyed by.
_KEY_CHARS = 40


def text_digest(text: str) -> str:
    """Key of one exact text in the reference cache."""
    return hashlib.sha1(text.encode("utf-8", errors="surrogatepass"), usedforsecurity=False).hexdigest()


@dataclass
class WindowEmbeddings:
    """The window's embeddings in row order, and how many came from the store or were embedded by the report."""

    vectors: np.ndarray
    stored: int
    embedded: int
    seconds: float


def window_embeddings(
    encoder: DriftEncoder, ids: list[str], texts: list[str], stored: dict[str, bytes], batch_size: int = 64
) -> tuple[WindowEmbeddings, list[int]]:
    """Stored vectors where there are any, the rest embedded now; also the rows that were embedded now."""
    started = time.perf_counter()
    vectors = np.zeros((len(ids), encoder.dims), dtype=np.float32)
    width = encoder.dims * STORED_DTYPE.itemsize
    have = [i for i, pid in enumerate(ids) if len(stored.get(pid, b"")) == width]
    if have:
        vectors[have] = from_bytes([stored[ids[i]] for i in have], encoder.dims)
    held = set(have)
    missing = [i for i in range(len(ids)) if i not in held]
    if missing:
        # Stored rows are float16: round these the same way, so a row reads alike whichever way it came.
        fresh = encoder.embed([texts[i] for i in missing], batch_size=batch_size)
        vectors[missing] = fresh.astype(STORED_DTYPE).astype(np.float32)
    result = WindowEmbeddings(vectors, len(have), len(missing), time.perf_counter() - started)
    return result, missing


class ReferenceEmbeddings:
    """Embeddings of reference texts by the drift encoder, each text embedded once per encoder and kept on disk."""

    def __init__(self, home: Path, batch_size: int = 64) -> None:
        self.directory = home / "monitoring" / "embeddings"
        self.batch_size = batch_size
        self._loaded: dict[str, tuple[dict[str, int], np.ndarray]] = {}

    def embed(self, encoder: DriftEncoder, texts: list[str]) -> tuple[np.ndarray, int]:
        """Float32 rows for ``texts`` and how many of them had to be embedded now."""
        keys = [text_digest(t) for t in texts]
        index, vectors = self._cached(encoder)
        missing = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in index}.values())
        if missing:
            with self._locked(encoder.encoder_id):
                # Another process may have filled the cache meanwhile: read it again under the lock.
                self._loaded.pop(encoder.encoder_id, None)
                index, vectors = self._cached(encoder)
                missing = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in index}.values())
                if missing:
                    started = time.perf_counter()
                    fresh = encoder.embed([texts[i] for i in missing], batch_size=self.batch_size)
                    base = vectors.shape[0]
                    vectors = np.concatenate([vectors, fresh.astype(STORED_DTYPE)])
                    for offset, i in enumerate(missing):
                        index[keys[i]] = base + offset
                    self._save(encoder.encoder_id, index, vectors)
                    logger.info(
                        "embedded %d new reference texts with drift encoder %s in %.1fs",
                        len(missing),
                        encoder.encoder_id,
                        time.perf_counter() - started,
                    )
        rows = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
        return vectors[rows].astype(np.float32), len(missing)

    def _cached(self, encoder: DriftEncoder) -> tuple[dict[str, int], np.ndarray]:
        loaded = self._loaded.get(encoder.encoder_id)
        if loaded is not None:
            return loaded
        directory = self.directory / encoder.encoder_id
        index: dict[str, int] = {}
        vectors = np.zeros((0, encoder.dims), dtype=STORED_DTYPE)
        if (directory / VECTORS_FILE).is_file():
            try:
                keys = np.load(directory / KEYS_FILE)
                vectors = np.load(directory / VECTORS_FILE)
                if keys.shape[0] > vectors.shape[0] or vectors.shape[1:] != (encoder.dims,):
                    raise ValueError("keys and vectors differ in shape")
                # Rows only ever get appended: vectors a writer added after these keys are simply not used yet.
                vectors = vectors[: keys.shape[0]]
                index = {str(k): i for i, k in enumerate(keys)}
            except (OSError, ValueError) as exc:
                logger.warning("reference embedding cache of %s is unreadable (%s); rebuilding it", directory, exc)
                index, vectors = {}, np.zeros((0, encoder.dims), dtype=STORED_DTYPE)
        self._loaded[encoder.encoder_id] = (index, vectors)
        return index, vectors

    def _save(self, encoder_id: str, index: dict[str, int], vectors: np.ndarray) -> None:
        directory = self.directory / encoder_id
        keys = np.zeros(len(index), dtype=f"U{_KEY_CHARS}")
        for key, row in index.items():
            keys[row] = key
        # Keys are written last: a reader that finds new vectors beside old keys uses the rows the keys name.
        atomic_write(directory / VECTORS_FILE, lambda p: _save_npy(p, vectors))
        atomic_write(directory / KEYS_FILE, lambda p: _save_npy(p, keys))
        self._loaded[encoder_id] = (index, vectors)

    def _locked(self, encoder_id: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.directory / f".{encoder_id}.lock")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)
