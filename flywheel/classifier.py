"""A loaded text classifier: tokenizer, network (PyTorch, or an ONNX Runtime session), labels and batched inference.

Texts are tokenized once per forward pass: truncation is read from the tokenizer's overflow, not from a second,
untruncated tokenization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flywheel.network import SentenceClassifier, load_network

logger = logging.getLogger(__name__)


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Probabilities:
    """Class probabilities for a batch of texts, in input order."""

    probs: np.ndarray
    truncated: list[bool]


class Classifier:
    """Inference over a fine-tuned sequence classifier stored in a directory.

    With ``session`` (an ONNX Runtime session of the same network, see ``flywheel.runtime``) the forward passes run
    there, on the CPU; ``model`` then only supplies the config (labels, embedding width).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        *,
        version: str = "",
        device: torch.device | None = None,
        half: bool | None = None,
        session: Any = None,
        runtime: str = "torch",
    ) -> None:
        self.session = session
        self.runtime = runtime
        self.device = torch.device("cpu") if session is not None else device or pick_device()
        # Half precision halves memory and roughly doubles GPU throughput; CPU stays in float32.
        if half is None:
            half = self.device.type == "cuda" and session is None
        model.to(self.device, dtype=torch.float16) if half else model.to(self.device)
        model.eval()
        self.model = model
        #: What the forward passes compute in: the runtime's, or the weights' dtype.
        self.dtype = (
            "int8" if runtime.endswith("int8") else str(next(model.parameters()).dtype).removeprefix("torch.")
        )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.version = version
        # Both network layouts carry a Hugging Face config with the label maps and the embedding width.
        config: Any = cast(Any, model).config
        id2label: dict[int, str] = dict(config.id2label or {})
        self.hidden_size = int(config.hidden_size)
        self.labels: list[str] = [str(id2label[i]) for i in range(len(id2label))]

    @classmethod
    def load(cls, path: Path | str, max_length: int, version: str = "", device: str | None = None) -> Classifier:
        """Load the model and tokenizer saved with ``save_pretrained`` under ``path``."""
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = load_network(path)
        return cls(model, tokenizer, max_length=max_length, version=version, device=pick_device(device))

    def _encode(self, texts: list[str], tensors: str = "pt") -> tuple[dict[str, Any], list[bool]]:
        batch = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=True, return_tensors=tensors
        )
        encodings = batch.encodings
        # A fast tokenizer keeps what truncation cut as overflow; a slow one cannot say, so it tokenizes again.
        if encodings is not None:
            truncated = [bool(encoding.overflowing) for encoding in encodings]
        else:
            full = self.tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
            truncated = [len(ids) > self.max_length for ids in full]
        if tensors == "np":
            return dict(batch), truncated
        return {k: v.to(self.device) for k, v in batch.items()}, truncated

    def _session_outputs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """Logits, pooled embeddings and truncation of ``texts`` from the ONNX Runtime session."""
        inputs, cut = self._encode(texts, "np")
        feeds = {node.name: inputs[node.name].astype(np.int64) for node in self.session.get_inputs()}
        logits, pooled = self.session.run(None, feeds)
        return logits, pooled, cut

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> Probabilities:
        """Softmax probabilities; texts are length-sorted into micro-batches to minimise padding."""
        if not texts:
            return Probabilities(np.zeros((0, len(self.labels)), dtype=np.float32), [])
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        truncated = [False] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                if self.session is not None:
                    logits_np, _, cut = self._session_outputs([texts[i] for i in idx])
                    logits = torch.from_numpy(logits_np).float()
                else:
                    inputs, cut = self._encode([texts[i] for i in idx])
                    logits = self.model(**inputs).logits.float()
                probs[idx] = torch.softmax(logits, dim=-1).cpu().numpy()
                for i, flag in zip(idx, cut, strict=True):
                    truncated[i] = flag
        return Probabilities(probs, truncated)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Mean-pooled last hidden states: the model's own sentence embeddings."""
        if not texts:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                if self.session is not None:
                    out[idx] = self._session_outputs([texts[i] for i in idx])[1]
                    continue
                inputs, _ = self._encode([texts[i] for i in idx])
                if isinstance(self.model, SentenceClassifier):
                    pooled = self.model.pool(**inputs).float()
                else:
                    hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1].float()
                    mask = inputs["attention_mask"].unsqueeze(-1).float()
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[idx] = pooled.cpu().numpy()
        return out
