"""The CPU graph rewrite (models/rewrite.py): same values as PRelu, applied only where it pays."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from models.catalog import CATALOG
from models.cuda import CUDA_EP
from models.rewrite import cpu_prelu_is_slow, decompose_prelu, for_cpu, release
from models.runtime import CPU_EP, DevicePlan, open_session
from tasks.errors import ModelUnavailable

CPU_ONLY = DevicePlan([CPU_EP], None, "IDENT_DEVICE=cpu asks for the CPU only")
SLOW_HERE = cpu_prelu_is_slow(ort.__version__)


def cpu_session(source) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(source, options, providers=[CPU_EP])


def prelu_model(channels: int, second_slope: np.ndarray) -> onnx.ModelProto:
    """PRelu with a per-channel slope, then a second PRelu, on a name the rewrite might pick."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, channels, 3, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, channels, 3, 3])
    per_channel = np.resize(np.array([0.25, -0.5, 0.0, 2.0], np.float32), channels).reshape(channels, 1, 1)
    slopes = [
        numpy_helper.from_array(per_channel, "slope"),
        numpy_helper.from_array(second_slope.astype(np.float32), "prelu_rewrite_zero"),
    ]
    nodes = [
        helper.make_node("PRelu", ["x", "slope"], ["h"], name="first"),
        helper.make_node("PRelu", ["h", "prelu_rewrite_zero"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "two_prelus", [x], [y], slopes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def edge_case_input(channels: int) -> np.ndarray:
    x = np.random.default_rng(7).standard_normal((3, channels, 3, 3)).astype(np.float32) * 50
    x[0, :, 0] = [np.nan, np.inf, -np.inf]
    x[0, :, 1] = [-0.0, 1e-40, -1e-40]  # signed zero and subnormals
    x[1] = 0.0
    return x


@pytest.mark.parametrize(
    ("channels", "second_slope", "blocked_channels", "forms", "ops"),
    [
        (4, np.array([0.1]), 16, {"elementwise": 2}, ["Relu", "Min", "Mul", "Add"] * 2),
        (16, np.array([0.1]), None, {"elementwise": 2}, ["Relu", "Min", "Mul", "Add"] * 2),
        (16, np.linspace(-1, 1, 16).reshape(16, 1, 1), 16, {"blocked": 2}, ["Relu", "Conv", "Relu", "Conv", "Add"] * 2),
        (16, np.array([0.1]), 16, {"blocked": 1, "elementwise": 1},
         ["Relu", "Conv", "Relu", "Conv", "Add", "Relu", "Min", "Mul", "Add"]),
    ],
)
def test_the_rewrite_gives_prelus_values_for_every_kind_of_float(channels, second_slope, blocked_channels, forms, ops):
    model = prelu_model(channels, second_slope)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert decompose_prelu(rewritten, blocked_channels) == forms
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ops

    x = edge_case_input(channels)
    expected = cpu_session(model.SerializeToString()).run(None, {"x": x})[0]
    got = cpu_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(got, expected, equal_nan=True)
    assert np.isnan(got).any() and np.isinf(got).any(), "the edge cases reached the output"


def test_a_graph_without_prelu_is_left_alone():
    model = prelu_model(4, np.array([0.1]))
    for node in model.graph.node:
        node.op_type = "Max"
    before = model.SerializeToString()
    assert not decompose_prelu(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize(
    ("version", "slow"),
    [("1.20.1", False), ("1.26.0", False), ("1.27.0", True), ("1.31.1", True), ("1.28.0.dev20251104", True),
     ("2.0.0", True)],
)
def test_only_onnxruntime_releases_with_the_slow_kernel_are_rewritten(version, slow):
    assert cpu_prelu_is_slow(version) is slow
    assert release("1.31.1") == (1, 31)


def real_photo_crops(data_path, size: int, count: int = 8) -> np.ndarray:
    """Crops of a real photo, resized to the model's input: real pixel statistics, many sign patterns."""
    photo = next(p for p in sorted((data_path / "images").rglob("*.jpg")))
    image = cv2.imread(str(photo))
    height, width = image.shape[:2]
    side = min(height, width) // 2
    crops = []
    for k in range(count):
        top = (height - side) * k // max(1, count - 1)
        left = (width - side) * (count - 1 - k) // max(1, count - 1)
        crops.append(cv2.resize(image[top : top + side, left : left + side], (size, size)))
    return np.stack(crops)


@pytest.mark.parametrize("blocked_channels", [16, None])
@pytest.mark.parametrize(
    ("key", "size", "scale"),
    [("arcface_mobilefacenet", 112, "unit"), ("minifasnet_v2", 80, "raw"), ("minifasnet_v1se", 80, "raw")],
)
def test_the_vision_models_give_the_same_outputs_rewritten(models_path, data_path, key, size, scale,
                                                          blocked_channels):
    path = models_path / CATALOG[key].filename
    rewritten = onnx.load(str(path))
    forms = decompose_prelu(rewritten, blocked_channels)
    assert sum(forms.values()) == 33
    if blocked_channels is None:
        assert set(forms) == {"elementwise"}
    elif key == "arcface_mobilefacenet":
        assert forms == {"blocked": 33}, "MobileFaceNet's channels are all multiples of 16"
    crops = real_photo_crops(data_path, size).astype(np.float32)
    blob = (crops - 127.5) / 127.5 if scale == "unit" else crops
    feed = {"input": np.ascontiguousarray(blob.transpose(0, 3, 1, 2))}
    original = cpu_session(str(path)).run(None, feed)[0]
    got = cpu_session(rewritten.SerializeToString()).run(None, feed)[0]
    assert np.abs(original).max() > 0.01
    np.testing.assert_array_equal(got, original)


def test_cpu_sessions_report_the_rewrite_where_onnxruntime_needs_it(models_path):
    arcface = open_session(CATALOG["arcface_mobilefacenet"], models_path, CPU_ONLY, threads=1)
    yunet = open_session(CATALOG["yunet_2023mar"], models_path, CPU_ONLY, threads=1)
    assert yunet.status()["rewrites"] == [], "no PRelu, nothing to rewrite"
    if SLOW_HERE:
        rewrites = arcface.status()["rewrites"]
        assert rewrites and all(r.startswith("PRelu as Relu(x) + ") for r in rewrites)
        assert sum(int(r.rsplit(": ", 1)[1].split()[0]) for r in rewrites) == 33
    else:
        assert arcface.status()["rewrites"] == []


def test_a_session_that_asked_for_cuda_is_rewritten_only_if_it_ended_on_cpu(models_path):
    """Here CUDA is declined for real (no driver); on a GPU host the session keeps PRelu."""
    asked_for_cuda = DevicePlan([(CUDA_EP, {"device_id": 0}), CPU_EP], 0, None)
    session = open_session(CATALOG["minifasnet_v2"], models_path, asked_for_cuda, threads=1)
    if session.provider == CUDA_EP:
        assert session.status()["rewrites"] == []
    else:
        assert session.status()["message"].startswith("ONNX Runtime declined the CUDA execution provider")
        assert bool(session.status()["rewrites"]) is SLOW_HERE


@pytest.mark.skipif(not SLOW_HERE, reason=f"onnxruntime {ort.__version__} runs PRelu as it is")
def test_a_file_that_is_not_onnx_is_named(tmp_path):
    spec = dataclasses.replace(CATALOG["arcface_mobilefacenet"], sha256=None)
    (tmp_path / spec.filename).write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable, match="arcface.onnx is not a readable ONNX model"):
        open_session(spec, tmp_path, CPU_ONLY, threads=1)


def test_for_cpu_keeps_the_path_when_there_is_nothing_to_rewrite(models_path):
    path = models_path / CATALOG["yunet_2023mar"].filename
    graph = for_cpu(path, ort.__version__)
    assert graph.source == str(path) and graph.rewrites == ()
    assert for_cpu(models_path / CATALOG["arcface_mobilefacenet"].filename, "1.26.0").rewrites == ()
