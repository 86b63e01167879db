"""ArcFace face embedding: aligned 112x112 face -> unit-length identity vector.

What it is
    A face-recognition network trained with the ArcFace (additive angular
    margin) loss; the cosine of two embeddings says how likely two faces are the
    same person. The catalog's default is ``arcface_mobilefacenet``: a
    MobileFaceNet trained on CASIA-WebFace by bubbliiiing/arcface-pytorch,
    128-d, converted to ONNX (LFW 98.78% upstream). InsightFace's w600k_mbf
    (512-d, not normalised in-graph) is a drop-in: the dimension is read from
    the model output and normalisation is done here either way.

Source / licence
    github.com/bubbliiiing/arcface-pytorch, MIT; its training set CASIA-WebFace
    is for non-commercial research only (see MANIFEST.md before production).

Input / output
    Model: ``input`` (B, 3, 112, 112) float32, RGB, (pixel - 127.5) / 127.5.
    ``ArcFace.embed(aligned_faces)``: (N, 112, 112, 3) uint8 BGR faces aligned
    with :mod:`workers.vision.align` -> (N, D) float32, each row L2-normalised,
    so cosine similarity is a dot product. Colour order, mean and std come from
    the catalog spec (``rgb``, ``mean``, ``std``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.errors import InvalidInput

# Bounds one run's activation memory when a job brings many faces. On one CPU
# thread per-face cost grows with the batch (5.3 ms at 1, 5.6 at 16), so larger
# chunks would only pay off on a GPU.
MAX_BATCH = 32


class ArcFace:
    """An ArcFace-style embedding model on an ONNX Runtime-style session."""

    def __init__(self, session: Any, spec: Any):
        self.session = session
        self.spec = spec
        self.input_name = session.get_inputs()[0].name
        params = spec.params
        self.size = tuple(params.get("input_size", (112, 112)))
        self.rgb = bool(params.get("rgb", True))
        self.mean = float(params.get("mean", 127.5))
        self.std = float(params.get("std", 127.5))
        self.dim: int | None = None

    def embed(self, aligned_faces: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) aligned BGR faces -> (N, D) L2-normalised float32 embeddings."""
        faces = np.asarray(aligned_faces)
        if faces.ndim == 3:
            faces = faces[None]
        if faces.ndim != 4 or faces.shape[1:3] != (self.size[1], self.size[0]) or faces.shape[3] != 3:
            raise InvalidInput(
                f"ArcFace needs aligned faces of shape (N, {self.size[1]}, {self.size[0]}, 3), got {faces.shape}"
            )
        if faces.shape[0] == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        chunks = [self._run(faces[i : i + MAX_BATCH]) for i in range(0, faces.shape[0], MAX_BATCH)]
        return np.concatenate(chunks)

    def _run(self, faces: np.ndarray) -> np.ndarray:
        blob = arcface_blob(faces, rgb=self.rgb, mean=self.mean, std=self.std)
        out = self.session.run(None, {self.input_name: blob})[0]
        out = np.asarray(out, dtype=np.float32).reshape(faces.shape[0], -1)
        self.dim = out.shape[1]
        return unit_rows(out)


def arcface_blob(faces: np.ndarray, *, rgb: bool, mean: float, std: float) -> np.ndarray:
    """(N, H, W, 3) uint8 BGR faces -> the model's (N, 3, H, W) float32 input."""
    channels = faces[..., ::-1] if rgb else faces
    return np.ascontiguousarray(((channels.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (an all-zero row stays zero), so a dot product is a cosine."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
