"""The int8 graphs of a version: plain dynamic int8, and SmoothQuant int8 with the feed-forward outputs in fp32.

Plain dynamic int8 (ONNX Runtime's ``quantize_dynamic``: per-channel int8 weights, activations quantized per tensor
at run time) changed 1.8-3.4% of MiniLM champions' labels on held-out movie reviews, over the 1% the runtime gate
allows, so on such models it is refused. Two changes, measured on two 2,000-row champions and 2,000 held-out
reviews (``benchmarks/runtime_bench.py``), bring agreement from 97.7% / 98.3% to 99.0% / 99.4% at 1.4x ONNX fp32's
speed (plain: 1.9x):

- **SmoothQuant** (Xiao et al., 2023): a few input channels of each linear layer carry activations tens of times
  larger than the rest, so one per-tensor activation scale leaves the others a handful of int8 steps. Each channel
  ``j`` of a layer's input is divided by ``s_j = max|x_j|^a / max|W_j|^(1-a)`` and the weights' row ``j``
  multiplied by it: the product is unchanged in exact arithmetic, and the difficulty moves to the weights, which
  are quantized per output channel. ``max|x_j|`` is calibrated on real texts (padding excluded).
- **The feed-forward output projections stay fp32.** Their input is GELU's output, whose range is the widest in
  the network, and each of them ranked among the most sensitive layers when quantized alone.

Each smoothed input gets one ``Mul`` node shared by every projection reading it (query, key and value share one).
Tried and measured worse: per-token activation scales written as plain ONNX operators (99.5% agreement, but 1.1x
fp32's speed: the extra operators cost what int8 saves), a migration strength of 0.5 or 0.7 (95.9% / 98.1% without
the fp32 outputs), and passes of one text each (95.8%: padding inside the per-tensor scale is not the cause).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Migration strength ``a`` of SmoothQuant: measured 0.5 / 0.7 / 0.85 -> 95.9 / 98.1 / 98.3% agreement alone.
ALPHA = 0.85
#: Calibration texts at most, and per forward pass.
CALIBRATION_TEXTS = 512
CALIBRATION_BATCH = 32
#: Name fragment of the feed-forward output projections in the exported BERT-family graph
#: (``/network/encoder/layer.0/output/dense/MatMul``; attention's own is ``.../attention/output/dense/MatMul``).
FFN_OUTPUT = "/output/dense/MatMul"


def quantize(
    fp32: Path,
    int8: Path,
    tokenize: Callable[[list[str]], dict[str, np.ndarray]],
    texts: list[str],
    *,
    smooth: bool,
) -> None:
    """Write the int8 graph of ``fp32`` to ``int8``: plain dynamic int8 (per-channel weights), or with ``smooth``
    SmoothQuant calibrated on ``texts`` (``tokenize`` gives a pass's inputs) and the feed-forward outputs in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not smooth:
        with _quiet_root_logger():
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        return
    model, _ = _smoothed(fp32, tokenize, texts)
    excluded = [node.name for node in model.graph.node if node.op_type == "MatMul" and _is_ffn_output(node.name)]
    smoothed = int8.with_name(int8.name + ".smoothed")
    try:
        onnx.save(model, str(smoothed))
        with _quiet_root_logger():
            quantize_dynamic(
                str(smoothed), str(int8), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=excluded
            )
    finally:
        smoothed.unlink(missing_ok=True)
    logger.info(
        "int8 graph %s: smoothed on %d texts, %d feed-forward outputs kept fp32",
        int8,
        min(len(texts), CALIBRATION_TEXTS),
        len(excluded),
    )


def smooth_graph(
    fp32: Path, out: Path, tokenize: Callable[[list[str]], dict[str, np.ndarray]], texts: list[str]
) -> int:
    """Write the smoothed fp32 graph of ``fp32`` to ``out``: what :func:`quantize` quantizes (it computes what
    ``fp32`` computes, up to rounding); the number of activations smoothed."""
    import onnx

    model, smoothed = _smoothed(fp32, tokenize, texts)
    onnx.save(model, str(out))
    return smoothed


def _smoothed(
    fp32: Path, tokenize: Callable[[list[str]], dict[str, np.ndarray]], texts: list[str]
) -> tuple[Any, int]:
    """The graph of ``fp32`` with SmoothQuant's factors calibrated on ``texts``, and how many activations it
    smooths."""
    import onnx

    if not texts:
        raise ValueError("SmoothQuant needs calibration texts; none were given")
    model = onnx.load(str(fp32))
    groups = _projections(model)
    _smooth(model, groups, _activation_maxima(model, list(groups), tokenize, texts[:CALIBRATION_TEXTS]))
    return model, len(groups)


def _is_ffn_output(name: str) -> bool:
    return FFN_OUTPUT in name and "/attention/" not in name


def _projections(model: Any) -> dict[str, list[Any]]:
    """Activation tensor -> the MatMul nodes multiplying it by a constant 2-D weight, the feed-forward outputs
    (kept fp32) left out."""
    weights = {init.name: init for init in model.graph.initializer if len(init.dims) == 2}
    groups: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and not _is_ffn_output(node.name):
            groups[node.input[0]].append(node)
    return dict(groups)


def _activation_maxima(
    model: Any, names: list[str], tokenize: Callable[[list[str]], dict[str, np.ndarray]], texts: list[str]
) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each tensor in ``names`` over the real (unpadded) tokens of ``texts``."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {output.name for output in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names if name not in known
    )
    options = ort.SessionOptions()
    # Unoptimized: fused kernels would hide the intermediate tensors asked for.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for start in range(0, len(texts), CALIBRATION_BATCH):
        feed = tokenize(texts[start : start + CALIBRATION_BATCH])
        real = feed["attention_mask"].astype(bool)
        for name, value in zip(names, session.run(names, feed), strict=True):
            batch_max = np.abs(value[real]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], batch_max) if name in maxima else batch_max
    return maxima


def _smooth(model: Any, groups: dict[str, list[Any]], maxima: dict[str, np.ndarray]) -> None:
    """Divide each grouped activation by its smoothing factors (one ``Mul`` node) and scale the weights' rows."""
    import onnx
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    inserted = []
    for index, (activation, nodes) in enumerate(groups.items()):
        weights = [numpy_helper.to_array(initializers[node.input[1]]) for node in nodes]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        factors = (
            np.power(np.maximum(maxima[activation], 1e-5), ALPHA) / np.power(np.maximum(weight_max, 1e-5), 1 - ALPHA)
        ).astype(np.float32)
        factors = np.clip(factors, 1e-5, None)
        for node, weight in zip(nodes, weights, strict=True):
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight * factors[:, None], node.input[1]))
        inverse = f"smoothquant.{index}.inverse"
        smoothed = f"smoothquant.{index}.smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / factors).astype(np.float32), inverse))
        for node in nodes:
            node.input[0] = smoothed
        inserted.append((activation, onnx.helper.make_node("Mul", [activation, inverse], [smoothed], name=smoothed)))
    # Each Mul goes right after the node producing its activation, keeping the graph's topological order.
    producers = {output: position for position, node in enumerate(model.graph.node) for output in node.output}
    nodes = list(model.graph.node)
    for activation, mul in sorted(inserted, key=lambda item: producers.get(item[0], -1), reverse=True):
        nodes.insert(producers.get(activation, -1) + 1, mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # ONNX Runtime's quantizer advises pre-processing on the root logger; measured, it changes nothing here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
