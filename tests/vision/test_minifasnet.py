"""MiniFASNet liveness: upstream crop maths, batching, the ensemble and the labelled photos."""

from __future__ import annotations

import numpy as np
import pytest

from models.catalog import get_spec
from workers.vision.minifasnet import LivenessEnsemble, MiniFASNet, get_new_box, softmax


def test_new_box_grows_around_the_centre():
    # 100x100 box centred at (500, 400) in a 1000x800 frame, scale 2.7 -> 270x270.
    assert get_new_box(1000, 800, (450, 350, 100, 100), 2.7) == (365, 265, 635, 535)


def test_new_box_is_shifted_back_inside_the_frame():
    left, top, right, bottom = get_new_box(640, 480, (0, 0, 100, 100), 2.7)
    assert (left, top) == (0, 0) and (right, bottom) == (270, 270)
    left, top, right, bottom = get_new_box(640, 480, (600, 400, 40, 60), 4.0)
    assert right == 639 and bottom == 479 and left >= 0 and top >= 0


def test_new_box_scale_shrinks_when_it_cannot_fit():
    # 4.0 x 200 = 800 > 479: the scale drops to (480 - 1) / 200.
    left, top, right, bottom = get_new_box(640, 480, (220, 140, 200, 200), 4.0)
    assert bottom - top == pytest.approx(479, abs=1) and top == 0


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]]))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert p[1, 0] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def models(cpu_session_factory):
    v2 = MiniFASNet(cpu_session_factory("MiniFASNetV2.onnx"), get_spec("minifasnet_v2"))
    v1se = MiniFASNet(cpu_session_factory("MiniFASNetV1SE.onnx"), get_spec("minifasnet_v1se"))
    return v2, v1se


def _largest(analyses, decoded, path):
    return decoded[path], analyses[path]["faces"][0]["bbox"]


def test_patch_is_80x80_bgr(models, analyses, decoded):
    image, box = _largest(analyses, decoded, "images/liveness/live_T1.jpg")
    patch = models[0].patch(image, box)
    assert patch.shape == (80, 80, 3) and patch.dtype == np.uint8


def test_batch_across_images_equals_one_by_one(models, analyses, decoded):
    items = [_largest(analyses, decoded, p) for p in ("images/liveness/live_T1.jpg", "images/liveness/spoof_F1_print.jpg")]
    together = models[0].live_probability(items)
    alone = np.concatenate([models[0].live_probability([item]) for item in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_ensemble_is_the_mean_of_the_members(models, analyses, decoded):
    items = [_largest(analyses, decoded, "images/liveness/spoof_F1_print.jpg")]
    v2, v1se = (m.live_probability(items)[0] for m in models)
    assert LivenessEnsemble(models).score(items)[0] == pytest.approx((v2 + v1se) / 2, abs=1e-6)
    # Upstream's published numbers for its own sample images (MANIFEST.md).
    assert v2 == pytest.approx(0.018, abs=0.01) and v1se == pytest.approx(0.439, abs=0.03)


def test_liveness_photos_get_their_label(analyses, labelled_files):
    for path, result in analyses.items():
        if not path.startswith("images/liveness/"):
            continue
        live = result["faces"][0]["liveness"]
        expected = labelled_files[path]["labels"]["liveness"] == "real"
        assert live["is_live"] is expected, (path, live)


def test_ordinary_photos_come_out_live(analyses):
    scores = {
        path: result["faces"][0]["liveness"]["score"]
        for path, result in analyses.items()
        if path.startswith(("images/faces/", "images/multi_face/"))
    }
    spoofed = {p: round(s, 3) for p, s in scores.items() if s < 0.5}
    assert not spoofed, f"ordinary photos judged spoof: {spoofed}; all: {scores}"
