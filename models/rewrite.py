"""Exact graph rewrites that route a model around a slow ONNX Runtime CPU kernel.

Why
    From onnxruntime 1.27 on (1.27.0 to 1.32.0 measured, the newest at the time
    of writing), the CPU kernel of ``PRelu`` is 7 to 18 times slower than
    elementwise kernels computing the same values. On this project's 2-core
    machine, one intra-op thread, a (1, 64, 56, 56) tensor: PRelu 53 us on
    1.22-1.26, 934-989 us on 1.27-1.32; Relu(x) + slope * Min(x, 0) 139 us on
    1.31. The vision models are PReLU networks: ArcFace (MobileFaceNet) spent
    8.0 of its 14.4 ms in its 33 PRelu nodes, each MiniFASNet 2.3 of 4.5 ms.
    Only CPU sessions are rewritten (the CUDA kernel is a different one, not
    measured here for want of a GPU); ONNX Runtime before 1.27 keeps its own,
    faster, PRelu.

What
    ``decompose_prelu`` replaces every ``PRelu(x, slope)`` with one of two
    equivalent forms:

    - **blocked**: ``Relu(x) + Conv(Relu(Conv(x, -1)), -slope)``, both Convs
      1x1 and depthwise. On x86-64 ONNX Runtime runs convolutions over channel
      counts that fill its SIMD blocks in a blocked layout (NCHWc); this form
      stays in that layout (ORT can fuse the Relu and the Add into the Convs),
      where a Min or Mul would convert the tensor out of it and back. Used for a
      per-channel slope on a 4-D tensor whose channels are a multiple of 16
      (the AVX-512 block, a multiple of the AVX2 one). ArcFace: 6.7 -> 5.0 ms.
    - **elementwise**: ``Relu(x) + slope * Min(x, 0)``, for everything else.

    The values are the same as PRelu's, not merely close: each form adds zero
    to either x (x > 0) or slope * x (x < 0), a product by -1 and another by
    -slope is exact, and NaN and infinities come out as PRelu's do. Only the
    sign of a zero may differ (+0.0 for -0.0), which compares equal. The model
    file on disk is not touched; the session is built from the rewritten bytes.
"""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from tasks.errors import ModelUnavailable

# The first onnxruntime release with the slow CPU PRelu kernel.
SLOW_CPU_PRELU_SINCE = (1, 27)
# ONNX Runtime's blocked (NCHWc) convolutions exist on x86-64 only.
BLOCKED_LAYOUT_CHANNELS = 16 if platform.machine().lower() in ("x86_64", "amd64") else None

FORMS = {
    "blocked": "PRelu as Relu(x) + 1x1 depthwise convolutions",
    "elementwise": "PRelu as Relu(x) + slope * Min(x, 0)",
}


def release(version: str) -> tuple[int, int]:
    """'1.31.1' -> (1, 31); development suffixes ('1.28.0.dev2025') are ignored."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def cpu_prelu_is_slow(ort_version: str) -> bool:
    return release(ort_version) >= SLOW_CPU_PRELU_SINCE


class _Names:
    """Fresh tensor and node names that cannot collide with the graph's own."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = {name for node in graph.node for name in (*node.input, *node.output, node.name)}
        self.taken |= {init.name for init in graph.initializer} | {value.name for value in graph.input}

    def __call__(self, stem: str) -> str:
        name, n = stem, 0
        while name in self.taken:
            n += 1
            name = f"{stem}_{n}"
        self.taken.add(name)
        return name


def decompose_prelu(model: onnx.ModelProto, blocked_channels: int | None = BLOCKED_LAYOUT_CHANNELS) -> Counter:
    """Rewrite every float PRelu node in place; returns how many took each form.

    ``blocked_channels``: use the blocked form where the channel count is a
    multiple of it; None never uses it.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    ranks = _ranks(model)
    fresh = _Names(graph)
    zero: list[str] = []  # the elementwise form's shared 0.0, added once
    nodes: list[onnx.NodeProto] = []
    forms: Counter = Counter()
    for node in graph.node:
        slope = initializers.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        if node.domain not in ("", "ai.onnx") or slope is None or slope.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        values = numpy_helper.to_array(slope)
        per_channel = values.ndim == 3 and values.shape[1:] == (1, 1)
        x = node.input[0]
        if blocked_channels and per_channel and values.shape[0] % blocked_channels == 0 and ranks.get(x) == 4:
            nodes += _blocked(node, values, graph, fresh)
            forms["blocked"] += 1
        else:
            if not zero:
                zero.append(fresh("prelu_rewrite_zero"))
                graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero[0]))
            nodes += _elementwise(node, zero[0], fresh)
            forms["elementwise"] += 1
    if forms:
        del graph.node[:]
        graph.node.extend(nodes)
    return forms


def _blocked(node: onnx.NodeProto, slope: np.ndarray, graph: onnx.GraphProto, fresh: _Names) -> list:
    """Relu(x) + Conv(Relu(Conv(x, -1)), -slope), both Convs 1x1 depthwise."""
    x, (y,) = node.input[0], node.output
    stem, channels = node.name or "prelu", slope.shape[0]
    negate, scale = fresh(f"{stem}/minus_one"), fresh(f"{stem}/minus_slope")
    graph.initializer.append(numpy_helper.from_array(np.full((channels, 1, 1, 1), -1, np.float32), negate))
    graph.initializer.append(numpy_helper.from_array((-slope).reshape(channels, 1, 1, 1), scale))
    positive, flipped, magnitude, scaled = (fresh(f"{stem}/{part}") for part in ("relu", "neg", "relu_neg", "scaled"))
    depthwise = {"group": channels, "kernel_shape": [1, 1]}
    return [
        helper.make_node("Relu", [x], [positive], name=fresh(f"{stem}/Relu")),
        helper.make_node("Conv", [x, negate], [flipped], name=fresh(f"{stem}/Negate"), **depthwise),
        helper.make_node("Relu", [flipped], [magnitude], name=fresh(f"{stem}/ReluNeg")),
        helper.make_node("Conv", [magnitude, scale], [scaled], name=fresh(f"{stem}/Scale"), **depthwise),
        helper.make_node("Add", [positive, scaled], [y], name=fresh(f"{stem}/Add")),
    ]


def _elementwise(node: onnx.NodeProto, zero: str, fresh: _Names) -> list:
    """Relu(x) + slope * Min(x, 0)."""
    (x, slope), (y,) = node.input, node.output
    stem = node.name or "prelu"
    positive, negative, scaled = (fresh(f"{stem}/{part}") for part in ("relu", "min0", "scaled"))
    return [
        helper.make_node("Relu", [x], [positive], name=fresh(f"{stem}/Relu")),
        helper.make_node("Min", [x, zero], [negative], name=fresh(f"{stem}/Min")),
        helper.make_node("Mul", [negative, slope], [scaled], name=fresh(f"{stem}/Mul")),
        helper.make_node("Add", [positive, scaled], [y], name=fresh(f"{stem}/Add")),
    ]


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor whose shape ONNX shape inference can tell."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)
    return {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in values
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")
    }


@dataclass(frozen=True)
class CpuGraph:
    """What to give ``InferenceSession`` for a CPU session: a path, or rewritten bytes."""

    source: str | bytes
    rewrites: tuple[str, ...]


def for_cpu(path: Path, ort_version: str) -> CpuGraph:
    """The model as a CPU session should load it under this onnxruntime."""
    if not cpu_prelu_is_slow(ort_version):
        return CpuGraph(str(path), ())
    try:
        model = onnx.load(str(path))
    except DecodeError as exc:
        raise ModelUnavailable(f"{path.name} is not a readable ONNX model: {exc}") from exc
    if not any(node.op_type == "PRelu" for node in model.graph.node):
        return CpuGraph(str(path), ())  # spares the shape inference and the re-serialising
    forms = decompose_prelu(model)
    if not forms:
        return CpuGraph(str(path), ())
    rewrites = tuple(f"{FORMS[form]}: {count} nodes" for form, count in sorted(forms.items()))
    return CpuGraph(model.SerializeToString(), rewrites)
