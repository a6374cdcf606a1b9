"""Back-translation: a text translated into another language and back is a paraphrase that keeps its meaning.

Two sequence-to-sequence translation models (MarianMT-style, loaded with ``AutoModelForSeq2SeqLM``) are named by the
user, there and back; none ships offline, so back-translation is off unless configured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

from flywheel.classifier import pick_device
from flywheel.errors import TrainingError

logger = logging.getLogger(__name__)

#: Texts per generate() call: large enough to use the cores, small enough that beam search fits in memory.
BATCH_SIZE = 16


class TranslationModelError(TrainingError):
    """A configured translation model cannot be loaded or run."""


class BackTranslator:
    """Round-trips texts through a translation model and its way back; callable on a batch of texts."""

    def __init__(
        self, forward: str, back: str, *, max_length: int = 128, seed: int = 0, device: str | None = None
    ) -> None:
        self.device = pick_device(device)
        self.max_length = max_length
        self.seed = seed
        self.forward = self._load(forward)
        self.back = self._load(back)

    def _load(self, name: str) -> tuple[PreTrainedTokenizerBase, Any]:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForSeq2SeqLM.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise TranslationModelError(
                f"cannot load translation model {name!r} for back-translation ({str(exc).splitlines()[0]}); set "
                "FLYWHEEL_BACK_TRANSLATION_MODELS to two local model directories, or Hugging Face ids this machine "
                "can download"
            ) from exc
        logger.info("back-translation model %s loaded", name)
        return tokenizer, model.to(self.device).eval()

    def __call__(self, texts: Sequence[str]) -> list[str]:
        """Each text translated there and back, in order."""
        # A model whose generation config samples then gives the same paraphrases on every run.
        torch.manual_seed(self.seed)
        return self._translate(self.back, self._translate(self.forward, list(texts)))

    @torch.inference_mode()
    def _translate(self, pair: tuple[PreTrainedTokenizerBase, Any], texts: list[str]) -> list[str]:
        tokenizer, model = pair
        out: list[str] = []
        for start in range(0, len(texts), BATCH_SIZE):
            batch = tokenizer(
                texts[start : start + BATCH_SIZE],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            # Beams and the like come from the model's own generation config: translation models ship tuned ones.
            generated = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=self.max_length
            )
            out.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
        return out
