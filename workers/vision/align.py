"""Five-point face alignment onto the ArcFace 112x112 template.

What it is
    The similarity transform (rotation, uniform scale, translation) that maps a
    face's five landmarks onto the canonical ArcFace template, and the warp of
    the face to a 112x112 crop with it.

Source / licence
    Our own numpy code. The template is the standard InsightFace/ArcFace one
    (``models.catalog.ARCFACE_TEMPLATE_112``); the estimator is Umeyama's
    least-squares similarity (IEEE TPAMI 13(4), 1991), the same one InsightFace
    reaches through ``skimage.transform.SimilarityTransform.estimate``.

Why least squares and not ``cv2.estimateAffinePartial2D(method=LMEDS)``
    With only five points a robust estimator fits minimal two-point subsets and
    throws the other points' information away; it also makes the crop depend on
    the random sampling. The template was built for a least-squares fit over
    all five points, so that is what the embedding model was trained on.

Input / output
    ``similarity_transform(src (5,2), dst (5,2))`` -> (2, 3) float64 matrix.
    ``align_faces(image_bgr, landmarks (N,5,2), template, size)`` ->
    (N, size, size, 3) uint8 BGR. Landmarks in YuNet order map 1:1 onto the
    template (right eye, left eye, nose, right and left mouth corner).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform taking ``src`` points onto ``dst``, as a 2x3 matrix."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    # Force a proper rotation: a reflection would mirror the face.
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    var_src = (src_c**2).sum() / n
    scale = (s * d).sum() / var_src if var_src > 0 else 1.0
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_faces(
    image_bgr: np.ndarray,
    landmarks: np.ndarray,
    template: Sequence[Sequence[float]],
    size: int = 112,
) -> np.ndarray:
    """Warp each face of ``image_bgr`` so that its landmarks land on ``template``."""
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    dst = np.asarray(template, dtype=np.float64) * (size / 112.0)
    out = np.zeros((landmarks.shape[0], size, size, 3), np.uint8)
    for i, points in enumerate(landmarks):
        matrix = similarity_transform(points, dst)
        out[i] = cv2.warpAffine(image_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    return out
