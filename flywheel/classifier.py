"""A loaded text classifier: tokenizer, network (PyTorch, or an ONNX Runtime session), labels and batched inference.

Texts are tokenized once per call: truncation is read from the tokenizer's overflow, not from a second, untruncated
tokenization, and the token counts decide the forward passes (:func:`plan_passes`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flywheel.network import SentenceClassifier, load_network

logger = logging.getLogger(__name__)

#: The tokenizer outputs the networks read; others (such as a special-tokens mask) are not passed on.
PASSED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Estimated cost of a forward pass on CPU, in units of one token of one row (see :func:`plan_passes`).
PASS_COST = 30.0
ROW_COST = 8.0
ATTENTION_SPAN = 200.0


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

    def _passes(self, texts: list[str], batch_size: int) -> Iterator[tuple[list[int], dict[str, Any], list[bool]]]:
        """Forward passes over ``texts``: each pass's text indices, padded inputs and truncation flags.

        The texts are tokenized once, ordered by token count and cut into passes of at most ``batch_size`` rows:
        on CPU where :func:`plan_passes` finds padding costs more than another pass, on CUDA in equal chunks.
        """
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        encodings = encoded.encodings
        # A fast tokenizer keeps what truncation cut as overflow; a slow one cannot say, so it tokenizes again.
        if encodings is not None:
            truncated = [bool(encoding.overflowing) for encoding in encodings]
        else:
            full = self.tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
            truncated = [len(ids) > self.max_length for ids in full]
        rows = {key: encoded[key] for key in PASSED_INPUTS if key in encoded}
        ids = rows["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        lengths = [len(ids[i]) for i in order]
        if self.device.type == "cpu":
            bounds = plan_passes(lengths, batch_size)
        else:
            bounds = [(start, min(start + batch_size, len(order))) for start in range(0, len(order), batch_size)]
        for start, end in bounds:
            idx = order[start:end]
            padded = self._pad(rows, idx, lengths[end - 1])
            inputs: dict[str, Any] = padded
            if self.session is None:
                inputs = {key: torch.from_numpy(value).to(self.device) for key, value in padded.items()}
            yield idx, inputs, [truncated[i] for i in idx]

    def _pad(self, rows: dict[str, list[list[int]]], idx: list[int], width: int) -> dict[str, np.ndarray]:
        """The rows ``idx`` of each input, padded to ``width`` on the tokenizer's padding side."""
        tokenizer = self.tokenizer
        fills = {"input_ids": tokenizer.pad_token_id or 0, "token_type_ids": tokenizer.pad_token_type_id}
        left = tokenizer.padding_side == "left"
        padded = {}
        for key, values in rows.items():
            array = np.full((len(idx), width), fills.get(key, 0), dtype=np.int64)
            for row, i in enumerate(idx):
                tokens = values[i]
                if left:
                    array[row, width - len(tokens) :] = tokens
                else:
                    array[row, : len(tokens)] = tokens
            padded[key] = array
        return padded

    def _session_outputs(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled embeddings from the ONNX Runtime session."""
        feeds = {node.name: inputs[node.name] for node in self.session.get_inputs()}
        logits, pooled = self.session.run(None, feeds)
        return logits, pooled

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> Probabilities:
        """Softmax probabilities, in input order; see :meth:`_passes` for how texts are batched."""
        probs = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        truncated = [False] * len(texts)
        if not texts:
            return Probabilities(probs, truncated)
        with torch.inference_mode():
            for idx, inputs, cut in self._passes(texts, batch_size):
                if self.session is not None:
                    logits = self._session_outputs(inputs)[0].astype(np.float32)
                else:
                    logits = self.model(**inputs).logits.float().cpu().numpy()
                probs[idx] = _softmax(logits)
                for i, flag in zip(idx, cut, strict=True):
                    truncated[i] = flag
        return Probabilities(probs, truncated)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Mean-pooled last hidden states: the model's own sentence embeddings."""
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        if not texts:
            return out
        with torch.inference_mode():
            for idx, inputs, _ in self._passes(texts, batch_size):
                if self.session is not None:
                    out[idx] = self._session_outputs(inputs)[1]
                    continue
                if isinstance(self.model, SentenceClassifier):
                    pooled = self.model.pool(**inputs).float()
                else:
                    hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1].float()
                    mask = inputs["attention_mask"].unsqueeze(-1).float()
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[idx] = pooled.cpu().numpy()
        return out


def plan_passes(lengths: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Cut texts of ascending token ``lengths`` into forward passes (``[start, end)`` bounds, at most ``max_rows``
    each) of least estimated CPU time.

    A pass of ``n`` rows padded to ``L`` tokens costs about ``PASS_COST + n * (ROW_COST + L + L**2 / ATTENTION_SPAN)``
    token-times: fitted on MiniLM-L6 in PyTorch and ONNX Runtime on 2 cores (a pass's overhead is worth about 30
    tokens, a row's about 8). Padding a short text to a long one's length costs more than a pass of its own, so
    length-sorted texts are cut where their lengths jump: on batches of 32 movie reviews about five passes, 1.2-1.4x
    the texts/s of equal passes of 16.
    """
    count = len(lengths)
    best = [0.0] + [math.inf] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        width = lengths[end - 1]
        per_row = ROW_COST + width + width * width / ATTENTION_SPAN
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + PASS_COST + (end - start) * per_row
            if cost < best[end]:
                best[end], cut[end] = cost, start
    bounds = []
    end = count
    while end:
        bounds.append((cut[end], end))
        end = cut[end]
    return bounds[::-1]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
