"""YuNet: our ONNX Runtime decode against cv2.FaceDetectorYN, letterbox maths, NMS, face counts."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from models.catalog import get_spec
from workers.vision.yunet import STRIDES, Detections, YuNet, decode, fit_size, letterbox, nms

TOLERANCE_PX = 2.0


# -- pure functions ---------------------------------------------------------


def test_fit_size_keeps_aspect_and_fits():
    assert fit_size(1200, 800, 640, 640) == (640, 427)
    assert fit_size(330, 512, 640, 640) == (412, 640)  # 412.5 rounds to even
    assert fit_size(640, 640, 640, 640) == (640, 640)
    assert fit_size(10000, 1, 640, 640) == (640, 1)


def test_letterbox_maps_points_back_to_original_pixels():
    image = np.zeros((800, 1200, 3), np.uint8)
    size = fit_size(1200, 800, 640, 640)
    canvas, lb = letterbox(image, size, (640, 640))
    assert canvas.shape == (640, 640, 3)
    assert (lb.width, lb.height) == (640, 427)
    # A box and landmarks in model-input pixels map back by the per-axis scale.
    det = Detections(
        np.array([[64.0, 42.7, 320.0, 213.5]], np.float32),
        np.array([0.9], np.float32),
        np.tile(np.array([[320.0, 213.5]], np.float32), (1, 5, 1)),
    )
    back = lb.to_original(det)
    np.testing.assert_allclose(back.boxes[0], [120.0, 80.0, 600.0, 400.0], atol=0.2)
    np.testing.assert_allclose(back.landmarks[0, 0], [600.0, 400.0], atol=0.2)


def test_letterbox_pads_with_zeros_at_bottom_right():
    image = np.full((100, 200, 3), 200, np.uint8)
    canvas, lb = letterbox(image, fit_size(200, 100, 640, 640), (640, 320))
    assert canvas[:320, :640].mean() == 200
    canvas, lb = letterbox(image, (64, 32), (96, 64))
    assert canvas[:32, :64].min() == 200 and canvas[32:].max() == 0 and canvas[:, 64:].max() == 0


def _raw_outputs(width: int, height: int) -> dict[str, np.ndarray]:
    out = {}
    for s in STRIDES:
        n = (width // s) * (height // s)
        out[f"cls_{s}"] = np.zeros((1, n, 1), np.float32)
        out[f"obj_{s}"] = np.zeros((1, n, 1), np.float32)
        out[f"bbox_{s}"] = np.zeros((1, n, 4), np.float32)
        out[f"kps_{s}"] = np.zeros((1, n, 10), np.float32)
    return out


def test_decode_one_anchor_by_hand():
    out = _raw_outputs(64, 64)
    cols, row, col = 64 // 16, 1, 2
    idx = row * cols + col
    out["cls_16"][0, idx] = 0.81
    out["obj_16"][0, idx] = 1.5  # clipped to 1
    out["bbox_16"][0, idx] = [0.5, 0.25, math.log(2), math.log(3)]
    out["kps_16"][0, idx] = [0.1 * i for i in range(10)]
    # A weaker, overlapping anchor at stride 8 that NMS must drop.
    j = 2 * 8 + 5
    out["cls_8"][0, j] = out["obj_8"][0, j] = 0.7
    out["bbox_8"][0, j] = [0.0, 0.0, math.log(4), math.log(6)]
    (det,) = decode(out, 64, 64, score_threshold=0.6, nms_iou=0.3, top_k=5000)
    assert len(det) == 1
    assert det.scores[0] == pytest.approx(0.9)  # sqrt(0.81 * 1)
    # cx=(2+0.5)*16=40, cy=(1+0.25)*16=20, w=2*16, h=3*16
    np.testing.assert_allclose(det.boxes[0], [24, -4, 56, 44], atol=1e-4)
    expected = [((0.2 * i + col) * 16, (0.2 * i + 0.1 + row) * 16) for i in range(5)]
    np.testing.assert_allclose(det.landmarks[0], expected, atol=1e-4)


def test_decode_drops_scores_under_threshold_and_checks_anchor_count():
    out = _raw_outputs(64, 64)
    out["cls_32"][0, 0] = out["obj_32"][0, 0] = 0.5
    assert len(decode(out, 64, 64, 0.6, 0.3, 5000)[0]) == 0
    assert len(decode(out, 64, 64, 0.4, 0.3, 5000)[0]) == 1
    with pytest.raises(ValueError, match="multiples of 32"):
        decode(out, 96, 64, 0.6, 0.3, 5000)


def test_nms_keeps_best_of_overlaps_and_honours_top_k():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [100, 100, 110, 110]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.95], np.float32)
    assert nms(boxes, scores, 0.6, 0.3, 5000).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.6, 0.3, 2).tolist() == [3, 1]
    assert nms(boxes[:0], scores[:0], 0.6, 0.3, 10).tolist() == []


# -- against OpenCV ----------------------------------------------------------


@pytest.fixture(scope="module")
def yunet_fixed(cpu_session_factory):
    return YuNet(cpu_session_factory("face_detection_yunet_2023mar.onnx"), get_spec("yunet_2023mar"), 0.6, 0.3, 5000)


@pytest.fixture(scope="module")
def yunet_dynamic(cpu_session_factory):
    return YuNet(cpu_session_factory("yunet_s_dynamic.onnx"), get_spec("yunet_s_dynamic"), 0.6, 0.3, 5000)


def test_matches_cv2_face_detector_yn(yunet_fixed, decoded, models_path):
    """Same file, same letterboxed 640x640 input: same faces, corners and landmarks within 2 px."""
    cv_detector = cv2.FaceDetectorYN.create(
        str(models_path / "face_detection_yunet_2023mar.onnx"), "", (640, 640), 0.6, 0.3, 5000
    )
    compared = 0
    for path, image in decoded.items():
        ours = yunet_fixed.detect(image)
        canvas, lb = letterbox(image, fit_size(image.shape[1], image.shape[0], 640, 640), (640, 640))
        _, faces = cv_detector.detect(canvas)
        faces = np.zeros((0, 15), np.float32) if faces is None else faces
        theirs_boxes = np.concatenate([faces[:, :2], faces[:, :2] + faces[:, 2:4]], axis=1)
        theirs_boxes /= [lb.scale_x, lb.scale_y, lb.scale_x, lb.scale_y]
        theirs_marks = faces[:, 4:14].reshape(-1, 5, 2) / [lb.scale_x, lb.scale_y]
        # A face right at the threshold may fall either side in the two engines.
        firm_ours = int((ours.scores >= 0.61).sum())
        firm_theirs = int((faces[:, 14] >= 0.61).sum())
        assert firm_ours == firm_theirs, f"{path}: {len(ours)} faces vs cv2 {len(faces)}"
        for box, marks, score in zip(ours.boxes, ours.landmarks, ours.scores):
            if score < 0.61:
                continue
            k = int(np.argmin(np.abs(theirs_boxes - box).max(axis=1)))
            assert np.abs(theirs_boxes[k] - box).max() <= TOLERANCE_PX, path
            assert np.abs(theirs_marks[k] - marks).max() <= TOLERANCE_PX, path
            assert abs(faces[k, 14] - score) < 0.01, path
            compared += 1
    assert compared >= 20


def test_dynamic_export_agrees_with_fixed_and_batches(yunet_fixed, yunet_dynamic, decoded):
    paths = ["images/faces/barack_obama_02.jpg", "images/faces/angelina_jolie_01.jpg", "images/multi_face/two_people.jpg"]
    images = [decoded[p] for p in paths]
    batch = yunet_dynamic.detect_batch(images)
    for path, image, together in zip(paths, images, batch):
        fixed = yunet_fixed.detect(image)
        alone = yunet_dynamic.detect(image)
        assert len(fixed) == len(alone) == len(together), path
        np.testing.assert_allclose(alone.boxes, fixed.boxes, atol=TOLERANCE_PX)
        np.testing.assert_allclose(together.boxes, alone.boxes, atol=TOLERANCE_PX)
        np.testing.assert_allclose(together.landmarks, alone.landmarks, atol=TOLERANCE_PX)
    assert yunet_dynamic.detect_batch([]) == []


def test_dynamic_export_faces_do_not_depend_on_batch_mates(yunet_dynamic, decoded):
    """A portrait beside a landscape photo would stretch its canvas: that padding moved
    scores near the edge and added a face, so images of other canvases run apart."""
    portrait = np.full((1000, 200, 3), 90, np.uint8)
    for path, image in decoded.items():
        alone = yunet_dynamic.detect(image)
        together, _ = yunet_dynamic.detect_batch([image, portrait])
        assert len(together) == len(alone), path
        np.testing.assert_array_equal(together.boxes, alone.boxes, err_msg=path)
        np.testing.assert_array_equal(together.scores, alone.scores, err_msg=path)


def test_landmarks_are_in_yunet_order(yunet_fixed, decoded):
    det = yunet_fixed.detect(decoded["images/faces/barack_obama_01.jpg"])
    right_eye, left_eye, nose, right_mouth, left_mouth = det.landmarks[0]
    # Subject's right is the image's left.
    assert right_eye[0] < left_eye[0] and right_mouth[0] < left_mouth[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(right_mouth[1], left_mouth[1])


def test_second_look_drops_painting_false_positives_only(cpu_session_factory, decoded):
    session = cpu_session_factory("face_detection_yunet_2023mar.onnx")
    plain = YuNet(session, get_spec("yunet_2023mar"), 0.6, 0.3, 5000)
    checked = YuNet(session, get_spec("yunet_2023mar"), 0.6, 0.3, 5000, second_look_below=0.8)
    # joe_biden_02 has a landscape painting that scores 0.6-0.7 as two "faces".
    image = decoded["images/faces/joe_biden_02.jpg"]
    assert len(plain.detect(image)) > 1
    assert len(checked.detect(image)) == 1
    # Confident faces are never second-guessed.
    image = decoded["images/multi_face/selfie_many_people.jpg"]
    before, after = plain.detect(image), checked.detect(image)
    assert (after.scores >= 0.8).sum() == (before.scores >= 0.8).sum()


# -- face counts through the pipeline ---------------------------------------


def test_face_counts_match_labels(analyses, labelled_files):
    wrong = {}
    for path, result in analyses.items():
        labels = labelled_files[path]["labels"]
        count = labels.get("face_count")
        low = labels.get("face_count_min", count)
        high = labels.get("face_count_max", count)
        got = len(result["faces"])
        if not low <= got <= high:
            wrong[path] = (got, low, high)
    assert not wrong, f"face count outside the labelled range (got, min, max): {wrong}"


def test_no_face_photos_have_no_faces(analyses):
    for path, result in analyses.items():
        if path.startswith("images/no_face/"):
            assert result["faces"] == [], path
