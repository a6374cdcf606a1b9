"""Inference runtimes of a model version, chosen per model and verified: PyTorch, ONNX Runtime, ONNX Runtime int8.

When a version is registered, :func:`build` exports its network to ONNX (two outputs: logits and the mean-pooled
sentence embedding, so drift and the review queue read the same runtime), writes an int8 copy
(dynamic per-channel int8; when that changes too many labels, SmoothQuant int8 with the feed-forward outputs in fp32:
:mod:`flywheel.quantization`), and measures every variant on
the evaluation texts: macro-F1 on their labels, agreement of its predicted labels with PyTorch fp32, texts/s. The
fastest variant whose macro-F1 is within ``FLYWHEEL_RUNTIME_MAX_F1_DROP`` of fp32's and whose labels agree on at
least ``FLYWHEEL_RUNTIME_MIN_AGREEMENT`` of the texts becomes the version's runtime; the card records the choice
and every variant's figures. A variant that fails to export or to run is recorded with its error and never served.

:func:`load_classifier` loads a version in its recorded runtime (``FLYWHEEL_RUNTIME`` overrides it); on CUDA the
automatic choice is PyTorch in half precision, which the GPU runs faster than ONNX Runtime's CPU kernels.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from flywheel.classifier import Classifier, pick_device
from flywheel.network import SentenceClassifier
from flywheel.quantization import quantize
from flywheel.registry import ModelVersion
from flywheel.settings import Settings

logger = logging.getLogger(__name__)

#: Files of the exported runtimes, beside the PyTorch weights in a version's model directory.
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
#: Texts per forward pass when variants are timed: the service's CPU forward batch.
TIMING_BATCH = 16
#: ONNX opset of the export: supported by every ONNX Runtime release of the last years.
OPSET = 17


class Runtime(StrEnum):
    """Where a version's forward passes run."""

    AUTO = "auto"
    TORCH = "torch"
    ONNX = "onnx"
    ONNX_INT8 = "onnx-int8"


FILES = {Runtime.ONNX: ONNX_FILE, Runtime.ONNX_INT8: INT8_FILE}


class Recipe(StrEnum):
    """How an int8 graph is made (:mod:`flywheel.quantization`); empty for the other runtimes."""

    NONE = ""
    DYNAMIC = "dynamic"
    SMOOTHQUANT = "smoothquant"


#: What registration builds, in order: fp32 ONNX, plain dynamic int8, and only when plain int8 changed too many
#: labels, SmoothQuant int8 (slower, closer to fp32), which then takes the int8 file's place.
BUILDS = (
    (Runtime.ONNX, Recipe.NONE),
    (Runtime.ONNX_INT8, Recipe.DYNAMIC),
    (Runtime.ONNX_INT8, Recipe.SMOOTHQUANT),
)


class VariantEvidence(BaseModel):
    """How one runtime did on the evaluation texts."""

    runtime: str
    #: How its int8 graph was made (dynamic or smoothquant); empty for fp32 runtimes.
    recipe: str = ""
    macro_f1: float | None = None
    #: Share of texts whose predicted label equals PyTorch fp32's.
    agreement: float | None = None
    texts_per_second: float | None = None
    accepted: bool = False
    reason: str = ""


class RuntimeChoice(BaseModel):
    """The runtime a version serves in, and the evidence it was chosen on."""

    runtime: str = Runtime.TORCH.value
    reason: str = ""
    texts: int = 0
    variants: list[VariantEvidence] = Field(default_factory=list)


def build(
    classifier: Classifier,
    model_dir: Path,
    texts: list[str],
    labels: list[str],
    settings: Settings,
    *,
    calibration: list[str] | None = None,
) -> RuntimeChoice:
    """Export the ONNX variants of ``classifier`` into ``model_dir``, measure them on ``texts`` (labelled
    ``labels``) and choose the runtime; ``FLYWHEEL_RUNTIME=torch`` builds nothing. The int8 graph is calibrated
    on ``calibration`` (training texts, so it is measured on texts it was not calibrated on; default ``texts``)."""
    if settings.runtime == Runtime.TORCH:
        return RuntimeChoice(reason="FLYWHEEL_RUNTIME=torch: no other runtime built")
    if not isinstance(classifier.model, SentenceClassifier):
        return RuntimeChoice(reason="a network saved before mean-pooled heads is served by PyTorch only")
    cpu = Classifier(classifier.model, classifier.tokenizer, classifier.max_length, device=torch.device("cpu"))
    reference, truth = _measure(cpu, Runtime.TORCH, texts, labels)
    reference.accepted, reference.reason = True, "reference (fp32)"
    variants = [reference]
    for runtime, recipe in BUILDS:
        if recipe == Recipe.SMOOTHQUANT and any(v.accepted for v in variants if v.runtime == runtime):
            break  # plain int8 kept the labels: it is the faster of the two
        try:
            _export(cpu, model_dir, runtime, recipe, calibration or texts)
            candidate = Classifier(
                cpu.model, cpu.tokenizer, cpu.max_length, session=session(model_dir / FILES[runtime]), runtime=runtime
            )
            evidence, _ = _measure(candidate, runtime, texts, labels, truth)
        except Exception as exc:  # noqa: BLE001 - any exporter or runtime fault only rules this variant out
            logger.warning("runtime %s (%s) not built for %s: %s", runtime.value, recipe or "export", model_dir, exc)
            reason = f"failed: {type(exc).__name__}: {exc}"[:300]
            variants.append(VariantEvidence(runtime=runtime.value, recipe=recipe, reason=reason))
            continue
        evidence.recipe = recipe
        evidence.accepted, evidence.reason = _verdict(evidence, reference, settings)
        variants.append(evidence)
    accepted = [v for v in variants if v.accepted]
    best = max(accepted, key=lambda v: v.texts_per_second or 0.0)
    choice = RuntimeChoice(
        runtime=best.runtime,
        reason=f"fastest of the runtimes within {settings.runtime_max_f1_drop:.3f} macro-F1 of fp32 and agreeing "
        f"on >= {settings.runtime_min_agreement:.0%} of {len(texts)} texts",
        texts=len(texts),
        variants=variants,
    )
    logger.info(
        "runtime %s chosen for %s: %s",
        choice.runtime,
        model_dir,
        ", ".join(f"{v.runtime} {v.texts_per_second or 0:.0f} texts/s ({v.reason})" for v in variants),
    )
    return choice


def session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``path`` using ``threads`` (default: PyTorch's) intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spinning: spinning threads take the cores the event loop and the
    # tokenizer need between forward passes (the service's PyTorch path sets OMP_WAIT_POLICY=PASSIVE likewise).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_classifier(entry: ModelVersion, settings: Settings, device: str | None = None) -> Classifier:
    """``entry`` loaded in the runtime its card chose (or ``FLYWHEEL_RUNTIME``); PyTorch when the chosen runtime's
    file is missing, on CUDA unless a runtime is named, and for cards written before runtimes were chosen."""
    card = entry.card
    classifier = Classifier.load(entry.model_dir, max_length=card.max_length, version=entry.version, device=device)
    wanted = Runtime(settings.runtime)
    if wanted == Runtime.AUTO:
        if pick_device(device).type == "cuda":
            return classifier
        wanted = Runtime(card.runtime)
    if wanted == Runtime.TORCH:
        return classifier
    path = entry.model_dir / FILES[wanted]
    if not path.exists():
        logger.warning("model %s has no %s runtime (%s missing); serving it with PyTorch", entry.version, wanted, path)
        return classifier
    return Classifier(
        classifier.model,
        classifier.tokenizer,
        classifier.max_length,
        version=entry.version,
        session=session(path),
        runtime=wanted.value,
    )


def evaluation_texts(frames: list[pd.DataFrame], extra: pd.DataFrame, minimum: int, seed: int) -> pd.DataFrame:
    """``frames`` (text, label) concatenated, topped up from ``extra`` to ``minimum`` rows when they are fewer."""
    rows = pd.concat([frame[["text", "label"]] for frame in frames], ignore_index=True)
    short = minimum - len(rows)
    if short > 0 and not extra.empty:
        rows = pd.concat(
            [rows, extra[["text", "label"]].sample(n=min(short, len(extra)), random_state=seed)], ignore_index=True
        )
    return rows


def _verdict(variant: VariantEvidence, reference: VariantEvidence, settings: Settings) -> tuple[bool, str]:
    drop = (reference.macro_f1 or 0.0) - (variant.macro_f1 or 0.0)
    if drop > settings.runtime_max_f1_drop:
        return False, f"macro-F1 {drop * 100:.2f} points below fp32 (allowed {settings.runtime_max_f1_drop * 100:.2f})"
    if (variant.agreement or 0.0) < settings.runtime_min_agreement:
        return False, f"labels agree with fp32 on {variant.agreement:.2%} (needed {settings.runtime_min_agreement:.0%})"
    return True, f"macro-F1 within {settings.runtime_max_f1_drop * 100:.2f} points, agreement {variant.agreement:.2%}"


def _measure(
    classifier: Classifier, runtime: Runtime, texts: list[str], labels: list[str], truth: np.ndarray | None = None
) -> tuple[VariantEvidence, np.ndarray]:
    """The variant's figures on ``texts`` (agreement with ``truth``, the reference's labels, when given) and the
    label indices it predicted."""
    from sklearn.metrics import f1_score

    classifier.predict_proba(texts[:TIMING_BATCH], batch_size=TIMING_BATCH)  # warm-up: first-call allocations
    started = time.perf_counter()
    predicted = classifier.predict_proba(texts, batch_size=TIMING_BATCH).probs.argmax(axis=1)
    seconds = time.perf_counter() - started
    names = np.asarray(classifier.labels)[predicted]
    evidence = VariantEvidence(
        runtime=runtime.value,
        macro_f1=round(float(f1_score(labels, names, average="macro", labels=classifier.labels)), 6),
        agreement=None if truth is None else round(float((predicted == truth).mean()), 6),
        texts_per_second=round(len(texts) / seconds, 1),
    )
    return evidence, predicted


def onnx_inputs(classifier: Classifier) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """The exported graph's inputs for a batch of texts, as ``classifier`` tokenizes them."""
    tokenizer, max_length = classifier.tokenizer, classifier.max_length

    def tokenize(batch: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        return {name: np.asarray(value, dtype=np.int64) for name, value in encoded.items()}

    return tokenize


class _Outputs(torch.nn.Module):
    """The network as the ONNX graph computes it: logits and pooled embedding from the tokenizer's tensors."""

    def __init__(self, network: SentenceClassifier, names: list[str]) -> None:
        super().__init__()
        self.network = network
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = dict(zip(self.names, tensors, strict=True))
        pooled = self.network.pool(**inputs)
        return self.network.head(pooled), pooled


def _export(classifier: Classifier, model_dir: Path, runtime: Runtime, recipe: Recipe, calibration: list[str]) -> None:
    fp32 = model_dir / ONNX_FILE
    if not fp32.exists():
        sample = classifier.tokenizer(
            ["a short text", "a somewhat longer text to give the sequence axis two sizes"],
            padding=True,
            return_tensors="pt",
        )
        names = list(sample.keys())
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        network = classifier.model
        assert isinstance(network, SentenceClassifier)
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # The TorchScript exporter warns that it is legacy and that traced shape checks become constants; the
            # graph is checked against PyTorch on the evaluation texts before it may serve.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Outputs(network, names).eval(),
                tuple(sample[name] for name in names),
                str(fp32),
                input_names=names,
                output_names=["logits", "embedding"],
                dynamic_axes={**axes, "logits": {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
    if runtime == Runtime.ONNX_INT8:
        quantize(fp32, model_dir / INT8_FILE, onnx_inputs(classifier), calibration, smooth=recipe == Recipe.SMOOTHQUANT)
