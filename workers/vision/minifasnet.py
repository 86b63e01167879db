"""MiniFASNet silent face liveness (anti-spoofing): face box -> p(real).

What it is
    Minivision's Silent-Face-Anti-Spoofing networks. Each looks at an 80x80
    patch cut around the face with its own context scale and classifies it
    into 3 classes: 1 = real face, 0 and 2 = spoof (print, screen replay).
    ``MiniFASNetV2`` (scale 2.7) is the main model; ``MiniFASNetV1SE`` (scale
    4.0) is the second half of upstream's ensemble and is used when present.

Source / licence
    github.com/minivision-ai/Silent-Face-Anti-Spoofing (Apache-2.0),
    ``resources/anti_spoof_models/{2.7_80x80_MiniFASNetV2,4_0_0_80x80_MiniFASNetV1SE}.pth``
    converted to ONNX.

Input / output
    Model: ``input`` (B, 3, 80, 80) float32, BGR, RAW 0..255 (upstream's
    to_tensor has its /255 removed - a classic integration bug), output
    ``logits`` (B, 3).
    ``MiniFASNet.patch(image_bgr, box_xyxy)`` -> (80, 80, 3) uint8 crop.
    ``MiniFASNet.probabilities(patches)`` -> (N, 3) softmax.
    ``LivenessEnsemble.score(items)`` -> (N,) p(real): the mean of the members'
    softmax for the live class, i.e. upstream test.py's summed prediction / 2.

Preprocessing
    ``_get_new_box`` below is upstream ``CropImage._get_new_box``: the box is
    grown around its centre by the model's scale, shrunk if it cannot fit the
    frame, then shifted back inside it; the crop is resized to 80x80.
"""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

# As for ArcFace: bounds memory; CPU gains nothing from bigger batches here.
MAX_BATCH = 32


def get_new_box(src_w: int, src_h: int, bbox_xywh: Sequence[float], scale: float) -> tuple[int, int, int, int]:
    """Upstream CropImage._get_new_box: the grown box (x1, y1, x2, y2), inclusive corners."""
    x, y, box_w, box_h = (float(v) for v in bbox_xywh)
    # Degenerate boxes would divide by zero below; one pixel is the least a box can be.
    box_w, box_h = max(box_w, 1.0), max(box_h, 1.0)
    scale = min((src_h - 1) / box_h, min((src_w - 1) / box_w, scale))
    new_width = box_w * scale
    new_height = box_h * scale
    center_x, center_y = box_w / 2 + x, box_h / 2 + y
    left_top_x = center_x - new_width / 2
    left_top_y = center_y - new_height / 2
    right_bottom_x = center_x + new_width / 2
    right_bottom_y = center_y + new_height / 2
    if left_top_x < 0:
        right_bottom_x -= left_top_x
        left_top_x = 0
    if left_top_y < 0:
        right_bottom_y -= left_top_y
        left_top_y = 0
    if right_bottom_x > src_w - 1:
        left_top_x -= right_bottom_x - src_w + 1
        right_bottom_x = src_w - 1
    if right_bottom_y > src_h - 1:
        left_top_y -= right_bottom_y - src_h + 1
        right_bottom_y = src_h - 1
    return int(left_top_x), int(left_top_y), int(right_bottom_x), int(right_bottom_y)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class MiniFASNet:
    """One MiniFASNet model on an ONNX Runtime-style session."""

    def __init__(self, session: Any, spec: Any):
        self.session = session
        self.spec = spec
        self.input_name = session.get_inputs()[0].name
        self.scale = float(spec.params["scale"])
        self.size = tuple(spec.params.get("input_size", (80, 80)))
        self.live_class = int(spec.params.get("live_class", 1))

    def patch(self, image_bgr: np.ndarray, box_xyxy: Sequence[float]) -> np.ndarray:
        """The model's input patch for one face box (x1, y1, x2, y2) of ``image_bgr``."""
        src_h, src_w = image_bgr.shape[:2]
        x1, y1, x2, y2 = (float(v) for v in box_xyxy)
        left, top, right, bottom = get_new_box(src_w, src_h, (x1, y1, x2 - x1, y2 - y1), self.scale)
        left, top = max(left, 0), max(top, 0)
        crop = image_bgr[top : bottom + 1, left : right + 1]
        if crop.size == 0:
            crop = image_bgr
        return cv2.resize(crop, self.size)

    def probabilities(self, patches: np.ndarray) -> np.ndarray:
        """(N, 80, 80, 3) BGR patches -> (N, classes) softmax."""
        patches = np.asarray(patches)
        if patches.shape[0] == 0:
            return np.zeros((0, 3), np.float32)
        out = []
        for i in range(0, patches.shape[0], MAX_BATCH):
            blob = patches[i : i + MAX_BATCH].astype(np.float32).transpose(0, 3, 1, 2)
            logits = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})[0]
            out.append(softmax(np.asarray(logits, dtype=np.float64)))
        return np.concatenate(out).astype(np.float32)

    def live_probability(self, items: Sequence[tuple[np.ndarray, Sequence[float]]]) -> np.ndarray:
        """p(real) for (image, box) pairs, in one batch whatever image each box is from."""
        if not items:
            return np.zeros((0,), np.float32)
        patches = np.stack([self.patch(image, box) for image, box in items])
        return self.probabilities(patches)[:, self.live_class]


class LivenessEnsemble:
    """Upstream's ensemble: average the members' softmax (sum / count)."""

    def __init__(self, models: Sequence[MiniFASNet]):
        if not models:
            raise ValueError("a liveness ensemble needs at least one model")
        self.models = list(models)

    def score(self, items: Sequence[tuple[np.ndarray, Sequence[float]]]) -> np.ndarray:
        """p(real) for (image, box_xyxy) pairs."""
        if not items:
            return np.zeros((0,), np.float32)
        total = np.zeros((len(items),), np.float64)
        for model in self.models:
            total += model.live_probability(items)
        return (total / len(self.models)).astype(np.float32)
