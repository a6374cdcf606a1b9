"""The classifier network: a pretrained encoder, mean pooling over its tokens, and a linear head.

Sentence-embedding models such as all-MiniLM-L6-v2 were trained to be read through the mean of their token states,
not through BERT's ``[CLS]`` pooler (whose weights they carry untrained), so the head reads what the encoder was
built to say. A version is stored as the encoder's own ``save_pretrained`` directory (its config carries the label
maps) plus the head in ``HEAD_FILE``; versions saved before this layout, as a Hugging Face sequence classifier, load
as they were trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

logger = logging.getLogger(__name__)

#: Weights of the linear head, beside the encoder's files.
HEAD_FILE = "classification_head.safetensors"
#: Shape of the head and how token states are pooled.
HEAD_CONFIG = "classification_head.json"


class SentenceClassifier(torch.nn.Module):
    """Encoder, masked mean pooling, dropout and a linear layer; called like a Hugging Face classifier."""

    def __init__(self, encoder: PreTrainedModel, labels: list[str], dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(int(encoder.config.hidden_size), len(labels))
        #: Whether the head's weights came from a stored version (a warm start) rather than a fresh initialisation.
        self.head_restored = False
        self.set_labels(labels)

    @property
    def config(self) -> Any:
        """The encoder's config, which carries ``id2label`` like a Hugging Face classifier's."""
        return self.encoder.config

    @property
    def labels(self) -> list[str]:
        """Label names in the order of the head's outputs."""
        return [str(self.config.id2label[i]) for i in range(self.head.out_features)]

    def set_labels(self, labels: list[str]) -> None:
        """Record the label maps on the encoder's config, so they are saved with it."""
        self.config.id2label = dict(enumerate(labels))
        self.config.label2id = {label: i for i, label in enumerate(labels)}

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over real (unpadded) tokens: the sentence embedding."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> Any:
        return SequenceClassifierOutput(logits=self.head(self.dropout(self.pool(input_ids, attention_mask, **inputs))))

    def save_pretrained(self, directory: Path) -> None:
        """Write the encoder (with label maps), the head and its shape."""
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(directory / HEAD_FILE))
        shape = {"pooling": "mean", "hidden_size": self.head.in_features, "num_labels": self.head.out_features}
        (directory / HEAD_CONFIG).write_text(json.dumps(shape, indent=2))

    @classmethod
    def from_pretrained(cls, path: Path | str, labels: list[str] | None = None) -> SentenceClassifier:
        """Load a saved version, or start from a base encoder with a fresh head.

        With ``labels`` given, a stored head for other labels is dropped and a fresh one made (a warm start keeps
        the encoder). A base model, or a version saved as a Hugging Face sequence classifier, gives its encoder.
        """
        path = Path(path)
        # A BERT-family encoder keeps its [CLS] pooler here unused: dropping it would need a flag other families lack.
        encoder = AutoModel.from_pretrained(str(path))
        stored = _stored_labels(encoder) if (path / HEAD_FILE).exists() else None
        model = cls(encoder, labels or stored or [])
        if stored is not None and (labels is None or labels == stored):
            model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
            model.head_restored = True
        elif labels is None:
            raise FileNotFoundError(f"{path} has no classification head ({HEAD_FILE}); give the labels to start one")
        return model


def is_sentence_classifier(path: Path | str) -> bool:
    """Whether ``path`` holds a version saved in this module's layout."""
    return (Path(path) / HEAD_FILE).exists()


def load_network(path: Path | str) -> torch.nn.Module:
    """The stored network of a version, whichever layout it was saved in."""
    if is_sentence_classifier(path):
        return SentenceClassifier.from_pretrained(path)
    logger.info("loading %s as a Hugging Face sequence classifier (saved before mean-pooled heads)", path)
    module: torch.nn.Module = AutoModelForSequenceClassification.from_pretrained(str(path))
    return module


def _stored_labels(encoder: PreTrainedModel) -> list[str]:
    id2label: dict[Any, str] = dict(encoder.config.id2label or {})
    return [str(id2label[i]) for i in range(len(id2label))]

