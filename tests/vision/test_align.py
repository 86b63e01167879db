"""Five-point alignment: the least-squares similarity fit and the 112x112 warp."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.catalog import ARCFACE_TEMPLATE_112
from workers.vision.align import align_faces, similarity_transform

TEMPLATE = np.array(ARCFACE_TEMPLATE_112)


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([r, [[tx], [ty]]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


@pytest.mark.parametrize("angle,scale,tx,ty", [(0, 1, 0, 0), (17, 2.5, 300, -40), (-85, 0.3, 12, 900), (180, 1.1, 5, 5)])
def test_recovers_an_exact_similarity(angle, scale, tx, ty):
    # Landmarks in a photo = the template moved by some similarity; the fit must undo it.
    forward = _similarity(angle, scale, tx, ty)
    photo_points = _apply(forward, TEMPLATE)
    matrix = similarity_transform(photo_points, TEMPLATE)
    np.testing.assert_allclose(_apply(matrix, photo_points), TEMPLATE, atol=1e-9)


def test_agrees_with_opencv_on_noise_free_points():
    photo_points = _apply(_similarity(23, 3.0, 410, 120), TEMPLATE)
    ours = similarity_transform(photo_points, TEMPLATE)
    theirs, _ = cv2.estimateAffinePartial2D(photo_points, TEMPLATE, method=cv2.LMEDS)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_least_squares_beats_lmeds_on_noisy_points():
    rng = np.random.default_rng(7)
    for _ in range(20):
        photo_points = _apply(_similarity(rng.uniform(-40, 40), rng.uniform(0.5, 4), 200, 200), TEMPLATE)
        photo_points += rng.normal(0, 2.0, photo_points.shape)
        ours = similarity_transform(photo_points, TEMPLATE)
        theirs, _ = cv2.estimateAffinePartial2D(photo_points, TEMPLATE, method=cv2.LMEDS)
        err_ours = ((_apply(ours, photo_points) - TEMPLATE) ** 2).sum()
        err_theirs = ((_apply(theirs, photo_points) - TEMPLATE) ** 2).sum()
        assert err_ours <= err_theirs + 1e-9


def test_never_mirrors():
    # A mirrored landmark set is best fitted by a reflection; we must return a rotation.
    mirrored = TEMPLATE * [-1, 1] + [200, 0]
    matrix = similarity_transform(mirrored, TEMPLATE)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_bad_point_sets_are_rejected():
    with pytest.raises(ValueError):
        similarity_transform(np.zeros((5, 2)), np.zeros((4, 2)))


def test_align_faces_puts_landmarks_on_the_template():
    image = np.zeros((400, 400, 3), np.uint8)
    forward = _similarity(30, 2.0, 150, 60)
    landmarks = _apply(forward, TEMPLATE)
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    aligned = align_faces(image, landmarks[None], ARCFACE_TEMPLATE_112)
    assert aligned.shape == (1, 112, 112, 3) and aligned.dtype == np.uint8
    for x, y in TEMPLATE:
        assert aligned[0, int(round(y)), int(round(x))].max() > 100


def test_align_faces_on_a_real_face(decoded, cpu_session_factory):
    from models.catalog import get_spec
    from workers.vision.yunet import YuNet

    image = decoded["images/faces/jennifer_aniston_01.jpg"]
    det = YuNet(cpu_session_factory("face_detection_yunet_2023mar.onnx"), get_spec("yunet_2023mar")).detect(image)
    aligned = align_faces(image, det.landmarks, ARCFACE_TEMPLATE_112)
    assert aligned.shape == (len(det), 112, 112, 3)
    # The face fills the crop: no black border in the centre.
    assert aligned[0, 40:80, 40:80].min(axis=(0, 1)).max() > 0
    assert align_faces(image, np.zeros((0, 5, 2)), ARCFACE_TEMPLATE_112).shape == (0, 112, 112, 3)
