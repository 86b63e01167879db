"""Exact graph rewrites that route a model around a slow ONNX Runtime CPU kernel.

Why
    From onnxruntime 1.27 on (1.27.0 to 1.32.0 measured, the newest at the time
    of writing), the CPU kernel of ``PRelu`` is 7 to 18 times slower than the
    four elementwise kernels that compute the same values. On this project's
    2-core machine, one intra-op thread, a (1, 64, 56, 56) tensor: PRelu 53 us
    on 1.22-1.26, 934-989 us on 1.27-1.32; Relu(x) + slope * Min(x, 0) 139 us
    on 1.31. The vision models are PReLU networks: ArcFace (MobileFaceNet)
    spent 8.0 of its 14.4 ms in its 33 PRelu nodes, each MiniFASNet 2.3 of
    4.5 ms. The CUDA kernel is not affected, so only CPU sessions are
    rewritten; ONNX Runtime before 1.27 keeps its own, faster, PRelu.

What
    ``decompose_prelu`` replaces every ``PRelu(x, slope)`` with
    ``Relu(x) + slope * Min(x, 0)``. The values are the same, not merely
    close: where x > 0 it adds slope * 0 = 0 to x, where x < 0 it adds
    slope * x to 0, and NaN and infinities come out as PRelu's do. Only the
    sign of a zero may differ (+0.0 for -0.0), which compares equal. The model
    file on disk is not touched; the session is built from the rewritten bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# The first onnxruntime release with the slow CPU PRelu kernel.
SLOW_CPU_PRELU_SINCE = (1, 27)


def release(version: str) -> tuple[int, int]:
    """'1.31.1' -> (1, 31); development suffixes ('1.28.0.dev2025') are ignored."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def cpu_prelu_is_slow(ort_version: str) -> bool:
    return release(ort_version) >= SLOW_CPU_PRELU_SINCE


def decompose_prelu(model: onnx.ModelProto) -> int:
    """Rewrite every PRelu node in place; returns how many there were."""
    graph = model.graph
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {init.name for init in graph.initializer} | {value.name for value in graph.input}

    def fresh(stem: str) -> str:
        name, n = stem, 0
        while name in taken:
            n += 1
            name = f"{stem}_{n}"
        taken.add(name)
        return name

    zero: str | None = None
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        if zero is None:
            zero = fresh("prelu_rewrite_zero")
            graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
        x, slope = node.input
        (y,) = node.output
        stem = node.name or f"prelu_{count}"
        positive, negative, scaled = fresh(f"{stem}/relu"), fresh(f"{stem}/min0"), fresh(f"{stem}/scaled")
        nodes += [
            helper.make_node("Relu", [x], [positive], name=fresh(f"{stem}/Relu")),
            helper.make_node("Min", [x, zero], [negative], name=fresh(f"{stem}/Min")),
            helper.make_node("Mul", [negative, slope], [scaled], name=fresh(f"{stem}/Mul")),
            helper.make_node("Add", [positive, scaled], [y], name=fresh(f"{stem}/Add")),
        ]
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


@dataclass(frozen=True)
class CpuGraph:
    """What to give ``InferenceSession`` for a CPU session: a path, or rewritten bytes."""

    source: str | bytes
    rewrites: tuple[str, ...]


def for_cpu(path: Path, ort_version: str) -> CpuGraph:
    """The model as a CPU session should load it under this onnxruntime."""
    if not cpu_prelu_is_slow(ort_version):
        return CpuGraph(str(path), ())
    model = onnx.load(str(path))
    # Float PRelu only: the rewrite's zero is float32, and every catalog model is float32.
    count = decompose_prelu(model) if _prelu_inputs_are_float(model) else 0
    if not count:
        return CpuGraph(str(path), ())
    return CpuGraph(model.SerializeToString(), (f"PRelu as Relu(x) + slope * Min(x, 0): {count} nodes",))


def _prelu_inputs_are_float(model: onnx.ModelProto) -> bool:
    float_type = onnx.TensorProto.FLOAT
    slopes = {node.input[1] for node in model.graph.node if node.op_type == "PRelu"}
    types = {init.name: init.data_type for init in model.graph.initializer}
    return bool(slopes) and all(types.get(name, float_type) == float_type for name in slopes)
