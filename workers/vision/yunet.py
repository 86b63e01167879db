"""YuNet face detector: boxes, scores and five landmarks per face.

What it is
    YuNet (yunet_s) from libfacedetection.train, the detector behind OpenCV's
    ``cv2.FaceDetectorYN``. Two exports of the same weights are supported:
    ``face_detection_yunet_2023mar.onnx`` (fixed 1x3x640x640, the OpenCV Zoo
    file) and ``yunet_s_dynamic.onnx`` (dynamic batch, sides multiples of 32).

Source / licence
    ShiqiYu/libfacedetection.train ``onnx/yunet_s_640_640.onnx`` and
    ``onnx/yunet_s_dynamic.onnx``; MIT per OpenCV Zoo (repository Apache-2.0).
    The decoding below follows OpenCV's ``FaceDetectorYNImpl::postProcess``
    (modules/objdetect/src/face_detect.cpp), reimplemented in numpy so that the
    model can run on any ONNX Runtime session, GPU included.

Input / output
    Model: ``input`` float32 NCHW, BGR, raw 0..255, no normalisation. Twelve
    outputs ``{cls,obj,bbox,kps}_{8,16,32}`` of shape (B, anchors, 1|1|4|10),
    anchors row-major over a (H/s) x (W/s) grid.
    ``YuNet.detect(image_bgr)`` -> :class:`Detections` in the ORIGINAL image's
    pixels: boxes (N, 4) x1 y1 x2 y2, scores (N,), landmarks (N, 5, 2) in YuNet
    order (right eye, left eye, nose tip, right and left mouth corner; the
    subject's right is the image's left), best score first.

Preprocessing
    The frame is scaled (aspect kept) so that it fits the model's input
    (640x640 by default), placed at the top-left corner and zero-padded: to
    exactly 640x640 for the fixed export, to the next multiples of 32 for the
    dynamic one (a 4:3 photo runs at 640x480 instead of 640x640). Top-left
    placement keeps the mapping back a pure per-axis scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
# Bounds one run's input memory (16 x 3 x 640 x 640 float32 is 79 MB).
MAX_BATCH = 16
OUTPUT_NAMES = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES)


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, best score first, in original-image pixels."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float32
    landmarks: np.ndarray  # (N, 5, 2) float32

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> "Detections":
        return cls(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)
        )

    def take(self, index: np.ndarray | Sequence[int]) -> "Detections":
        index = np.asarray(index, dtype=np.int64)
        return Detections(self.boxes[index], self.scores[index], self.landmarks[index])


@dataclass(frozen=True)
class Letterbox:
    """Where an image went inside the model input: per-axis scale, top-left anchored."""

    scale_x: float
    scale_y: float
    width: int  # resized image size inside the input
    height: int

    def to_original(self, det: Detections) -> Detections:
        factor = np.array([self.scale_x, self.scale_y], np.float32)
        boxes = det.boxes / np.tile(factor, 2)
        landmarks = det.landmarks / factor
        return Detections(boxes.astype(np.float32), det.scores, landmarks.astype(np.float32))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def fit_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """The size ``width x height`` takes when scaled, aspect kept, to fit the box."""
    scale = min(max_width / width, max_height / height)
    return max(1, min(max_width, round(width * scale))), max(1, min(max_height, round(height * scale)))


def letterbox(image: np.ndarray, size: tuple[int, int], canvas: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resize ``image`` to ``size`` (w, h) and paste it at the top-left of a zero ``canvas`` (w, h)."""
    src_h, src_w = image.shape[:2]
    new_w, new_h = size
    # INTER_AREA when shrinking: linear interpolation aliases fine detail away
    # and costs small faces their score.
    interp = cv2.INTER_AREA if new_w < src_w else cv2.INTER_LINEAR
    resized = image if (new_w, new_h) == (src_w, src_h) else cv2.resize(image, (new_w, new_h), interpolation=interp)
    out = np.zeros((canvas[1], canvas[0], 3), np.uint8)
    out[:new_h, :new_w] = resized
    return out, Letterbox(new_w / src_w, new_h / src_h, new_w, new_h)


def decode(
    outputs: dict[str, np.ndarray],
    input_width: int,
    input_height: int,
    score_threshold: float,
    nms_iou: float,
    top_k: int,
) -> list[Detections]:
    """Turn the twelve raw outputs of a batch into per-image detections (input pixels)."""
    batch = outputs["cls_8"].shape[0]
    per_stride = []
    for s in STRIDES:
        cols, rows = input_width // s, input_height // s
        expected = rows * cols
        cls = outputs[f"cls_{s}"].reshape(batch, -1)
        if cls.shape[1] != expected:
            raise ValueError(
                f"YuNet stride {s} gave {cls.shape[1]} anchors for a {input_width}x{input_height} input, "
                f"expected {expected}: the input sides must be multiples of 32"
            )
        obj = outputs[f"obj_{s}"].reshape(batch, -1)
        bbox = outputs[f"bbox_{s}"].reshape(batch, -1, 4)
        kps = outputs[f"kps_{s}"].reshape(batch, -1, 5, 2)
        idx = np.arange(expected)
        grid = np.stack([idx % cols, idx // cols], axis=-1).astype(np.float32)  # (anchors, 2) col,row
        score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
        per_stride.append((s, score, bbox, kps, grid))

    results = []
    for b in range(batch):
        boxes, scores, marks = [], [], []
        for s, score, bbox, kps, grid in per_stride:
            keep = np.nonzero(score[b] >= score_threshold)[0]
            if keep.size == 0:
                continue
            reg = bbox[b, keep]
            centre = (grid[keep] + reg[:, :2]) * s
            # exp() of a wild regression overflows to inf; clipping keeps NMS sane.
            size = np.exp(np.clip(reg[:, 2:4], -20.0, 20.0)) * s
            boxes.append(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
            scores.append(score[b, keep])
            marks.append((kps[b, keep] + grid[keep][:, None, :]) * s)
        if not scores:
            results.append(Detections.empty())
            continue
        det = Detections(
            np.concatenate(boxes).astype(np.float32),
            np.concatenate(scores).astype(np.float32),
            np.concatenate(marks).astype(np.float32),
        )
        results.append(det.take(nms(det.boxes, det.scores, score_threshold, nms_iou, top_k)))
    return results


def nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou: float, top_k: int) -> np.ndarray:
    """Indices kept by greedy NMS, best score first; ``top_k`` caps the candidates considered."""
    if scores.size == 0:
        return np.zeros((0,), np.int64)
    order = np.argsort(-scores, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    xywh = boxes[order].astype(np.float64).copy()
    xywh[:, 2:] -= xywh[:, :2]
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores[order].astype(float).tolist(), score_threshold, iou)
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    picked = order[kept]
    return picked[np.argsort(-scores[picked], kind="stable")]


class YuNet:
    """YuNet on an ONNX Runtime-style session (``run`` and ``get_inputs``)."""

    def __init__(
        self,
        session: Any,
        spec: Any,
        score_threshold: float = 0.6,
        nms_iou: float = 0.3,
        top_k: int = 5000,
        second_look_below: float | None = None,
    ):
        self.session = session
        self.spec = spec
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.top_k = int(top_k)
        self.second_look_below = second_look_below
        model_input = session.get_inputs()[0]
        self.input_name = model_input.name
        shape = list(model_input.shape)
        width, height = spec.params.get("input_size", (640, 640))
        # A fixed export dictates its own size, whatever the catalog says.
        fixed_hw = len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int)
        self.fixed_canvas: tuple[int, int] | None = (shape[3], shape[2]) if fixed_hw else None
        self.max_size = self.fixed_canvas or (int(width), int(height))
        self.multiple = int(spec.params.get("stride_multiple", 32))
        self.max_batch = shape[0] if isinstance(shape[0], int) else None

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """Faces in one BGR image, in its own pixel coordinates."""
        return self.detect_batch([image_bgr])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Faces in several images: one model run per canvas size when the export takes a batch.

        Every image is scaled to fit the model size and padded to its canvas:
        the fixed input, or its scaled size rounded up to a multiple of 32.
        Images run together only when their canvases match, because padding
        changes what YuNet sees near the edge: an image's faces must not
        depend on which other images share its batch.
        """
        if not images:
            return []
        sizes = [fit_size(im.shape[1], im.shape[0], *self.max_size) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (width, height) in enumerate(sizes):
            canvas = self.fixed_canvas or (round_up(width, self.multiple), round_up(height, self.multiple))
            groups.setdefault(canvas, []).append(index)
        results: list[Detections | None] = [None] * len(images)
        for canvas, indices in groups.items():
            boxes = [letterbox(images[i], sizes[i], canvas) for i in indices]
            found = self._run_canvases([b for b, _ in boxes])
            for i, (_, lb), det in zip(indices, boxes, found):
                results[i] = _inside(lb.to_original(det), lb)
        if self.second_look_below is not None:
            results = self._second_look(images, results)
        return results

    def _run_canvases(self, canvases: list[np.ndarray]) -> list[Detections]:
        height, width = canvases[0].shape[:2]
        chunk = self.max_batch or MAX_BATCH
        found: list[Detections] = []
        for start in range(0, len(canvases), chunk):
            blob = np.stack(canvases[start : start + chunk]).transpose(0, 3, 1, 2).astype(np.float32)
            raw = self.session.run(list(OUTPUT_NAMES), {self.input_name: blob})
            found += decode(dict(zip(OUTPUT_NAMES, raw)), width, height, self.score_threshold, self.nms_iou, self.top_k)
        return found

    def _second_look(self, images: Sequence[np.ndarray], results: list[Detections]) -> list[Detections]:
        """Re-detect low-confidence faces on a crop around them; drop those not found again.

        At one scale YuNet now and then scores face-like texture (paintings,
        foliage) between 0.6 and 0.75, as high as a real face cut by the frame.
        A real face is found again when its surroundings are re-framed around
        it; texture rarely is. A candidate under ``second_look_below`` is kept
        when a face whose centre lies inside its box is found in either of two
        square crops (2x and 3x its larger side, each scaled to 320x320, so the
        face is 107-160 px, where YuNet is most reliable). Four crops share one
        640x640 input, so the check costs one model run per two candidates.
        """
        todo = [
            (i, j)
            for i, det in enumerate(results)
            for j in np.nonzero(det.scores < self.second_look_below)[0].tolist()
        ]
        if not todo:
            return results
        tile, contexts = 320, (2.0, 3.0)
        canvas_w, canvas_h = self.fixed_canvas or (2 * tile, 2 * tile)
        per_canvas = (canvas_w // tile) * (canvas_h // tile)
        crops, expected = [], []
        for i, j in todo:
            box = results[i].boxes[j].astype(np.float64)
            centre = (box[:2] + box[2:]) / 2
            half = (box[2:] - box[:2]) / 2
            for context in contexts:
                side = context * max(half.max() * 2, 1.0)
                zoom = tile / side
                crops.append(_square_crop(images[i], centre, side, tile))
                expected.append(np.concatenate([tile / 2 - zoom * half, tile / 2 + zoom * half]))
        canvases, slots = [], []
        for k, crop in enumerate(crops):
            if k % per_canvas == 0:
                canvases.append(np.zeros((canvas_h, canvas_w, 3), np.uint8))
            cols = canvas_w // tile
            x0, y0 = ((k % per_canvas) % cols) * tile, ((k % per_canvas) // cols) * tile
            canvases[-1][y0 : y0 + tile, x0 : x0 + tile] = crop
            slots.append((len(canvases) - 1, x0, y0))
        found = self._run_canvases(canvases)
        confirmed = set()
        for k, (c, x0, y0) in enumerate(slots):
            det = found[c]
            centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2 - np.array([x0, y0], np.float32)
            lo, hi = expected[k][:2], expected[k][2:]
            if np.any(np.all((centres >= lo) & (centres <= hi), axis=1)):
                confirmed.add(todo[k // len(contexts)])
        out = []
        for i, det in enumerate(results):
            keep = [j for j in range(len(det)) if det.scores[j] >= self.second_look_below or (i, j) in confirmed]
            out.append(det if len(keep) == len(det) else det.take(keep))
        return out


def _square_crop(image: np.ndarray, centre: np.ndarray, side: float, tile: int) -> np.ndarray:
    """The ``side`` x ``side`` square around ``centre`` scaled to ``tile`` px, zero outside the image.

    Only the part inside the image is resized (INTER_AREA when shrinking, so a
    big face is not aliased away), never a padded copy that could be larger
    than the photo itself.
    """
    height, width = image.shape[:2]
    zoom = tile / side
    x0, y0 = centre[0] - side / 2, centre[1] - side / 2
    ix0, iy0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    ix1, iy1 = min(width, int(np.ceil(x0 + side))), min(height, int(np.ceil(y0 + side)))
    out = np.zeros((tile, tile, 3), np.uint8)
    if ix1 <= ix0 or iy1 <= iy0:
        return out
    tx0 = min(tile - 1, max(0, round((ix0 - x0) * zoom)))
    ty0 = min(tile - 1, max(0, round((iy0 - y0) * zoom)))
    tw = max(1, min(tile - tx0, round((ix1 - ix0) * zoom)))
    th = max(1, min(tile - ty0, round((iy1 - iy0) * zoom)))
    interp = cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR
    out[ty0 : ty0 + th, tx0 : tx0 + tw] = cv2.resize(image[iy0:iy1, ix0:ix1], (tw, th), interpolation=interp)
    return out


def _inside(det: Detections, lb: Letterbox) -> Detections:
    # A box centred in the zero padding is an artefact of the padding, not a face.
    centre = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2
    width, height = lb.width / lb.scale_x, lb.height / lb.scale_y
    ok = (centre[:, 0] >= 0) & (centre[:, 0] < width) & (centre[:, 1] >= 0) & (centre[:, 1] < height)
    return det if ok.all() else det.take(np.nonzero(ok)[0])
