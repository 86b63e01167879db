"""VisionPipeline: options, result shape, batching, bad inputs, verify, drawing, logs."""

from __future__ import annotations

import dataclasses
import logging
import time

import cv2
import msgpack
import numpy as np
import pytest

from tasks.errors import InvalidInput, LimitExceeded, NoFaceFound
from workers.vision.drawing import draw_file, draw_result
from workers.vision.pipeline import VisionPipeline, parse_options

OBAMA_1 = "images/faces/barack_obama_01.jpg"
OBAMA_2 = "images/faces/barack_obama_02.jpg"
JOLIE = "images/faces/angelina_jolie_01.jpg"
SELFIE = "images/multi_face/selfie_many_people.jpg"
COFFEE = "images/no_face/coffee.png"


@pytest.fixture(scope="module")
def read(data_path):
    return lambda rel: (data_path / rel).read_bytes()


# -- options ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options,key",
    [
        ({"max_face": 3}, "max_face"),
        ({"max_faces": "3"}, "max_faces"),
        ({"max_faces": True}, "max_faces"),
        ({"max_faces": 0}, "max_faces"),
        ({"max_faces": 2.0}, "max_faces"),
        ({"min_face_size": -1}, "min_face_size"),
        ({"min_face_size": float("nan")}, "min_face_size"),
        ({"min_face_size": float("inf")}, "min_face_size"),
        # JSON decodes a long run of digits to an int that no float holds.
        ({"min_face_size": 10**400}, "min_face_size"),
        ({"max_faces": -(10**5000)}, "max_faces"),
        ({"min_face_size": "big"}, "min_face_size"),
        ({"embed": 1}, "embed"),
        ({"liveness": "yes"}, "liveness"),
    ],
)
def test_bad_options_name_the_key(options, key):
    with pytest.raises(InvalidInput, match=f"'{key}'"):
        parse_options(options, 50)


def test_options_defaults_and_cap():
    assert parse_options(None, 50) == parse_options({}, 50)
    opts = parse_options({"max_faces": 500, "min_face_size": 20, "embed": False}, 50)
    assert (opts.max_faces, opts.min_face_size, opts.embed, opts.liveness) == (50, 20.0, False, True)
    with pytest.raises(InvalidInput, match="object"):
        parse_options(["max_faces"], 50)  # type: ignore[arg-type]


# -- result shape -----------------------------------------------------------


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in (int, float, bool, str)


def test_result_is_plain_json_and_msgpack_friendly(analyses):
    result = analyses[SELFIE]
    assert _plain(result)
    assert msgpack.unpackb(msgpack.packb(result)) == result
    assert set(result) == {"faces", "image", "timings_ms"}
    assert set(result["timings_ms"]) == {"decode", "detect", "embed", "liveness", "total"}
    assert all(v >= 0 for v in result["timings_ms"].values())
    assert result["image"] == {"width": 600, "height": 604}
    face = result["faces"][0]
    assert set(face) == {"bbox", "score", "landmarks", "embedding", "liveness"}
    assert len(face["bbox"]) == 4 and len(face["landmarks"]) == 5 and len(face["embedding"]) == 128
    assert set(face["liveness"]) == {"score", "is_live"}
    assert all(round(v, 2) == v for v in face["bbox"])


def test_faces_are_largest_first_and_inside_the_image(analyses):
    for path, result in analyses.items():
        areas = [(f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]) for f in result["faces"]]
        assert areas == sorted(areas, reverse=True), path
        w, h = result["image"]["width"], result["image"]["height"]
        for f in result["faces"]:
            x1, y1, x2, y2 = f["bbox"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, path


def test_options_shape_the_answer(pipeline, read, analyses):
    everything = analyses[SELFIE]["faces"]
    result = pipeline.analyze(read(SELFIE), {"max_faces": 2, "embed": False, "liveness": False})
    assert [f["bbox"] for f in result["faces"]] == [f["bbox"] for f in everything[:2]]
    assert all(f["embedding"] is None and f["liveness"] is None for f in result["faces"])
    assert result["timings_ms"]["embed"] == 0 and result["timings_ms"]["liveness"] == 0
    smallest_side = min(min(f["bbox"][2] - f["bbox"][0], f["bbox"][3] - f["bbox"][1]) for f in everything)
    result = pipeline.analyze(read(SELFIE), {"min_face_size": smallest_side + 1, "embed": False, "liveness": False})
    assert 0 < len(result["faces"]) < len(everything)


def test_settings_max_faces_caps_requests(vision_sessions, vision_specs, vision_settings, read):
    capped = VisionPipeline(vision_sessions, vision_specs, dataclasses.replace(vision_settings, max_faces=3))
    result = capped.analyze(read(SELFIE), {"max_faces": 10, "embed": False, "liveness": False})
    assert len(result["faces"]) == 3


def test_missing_roles_are_a_configuration_error(vision_sessions, vision_specs, vision_settings):
    from tasks.errors import ConfigurationError

    sessions = {k: v for k, v in vision_sessions.items() if k != "liveness"}
    with pytest.raises(ConfigurationError, match="liveness"):
        VisionPipeline(sessions, vision_specs, vision_settings)


def test_no_face_is_an_empty_list_not_an_error(analyses):
    assert analyses[COFFEE]["faces"] == []


# -- batching ---------------------------------------------------------------


def test_one_bad_image_does_not_fail_the_batch(pipeline, read):
    batch = pipeline.analyze_many([read(OBAMA_1), b"", read(JOLIE), read(OBAMA_2)], [None, None, {"bogus": 1}, None])
    assert isinstance(batch[1], InvalidInput) and "empty" in str(batch[1])
    assert isinstance(batch[2], InvalidInput) and "'bogus'" in str(batch[2])
    alone = pipeline.analyze(read(OBAMA_2))
    for key in ("bbox", "landmarks", "score"):
        assert batch[3]["faces"][0][key] == alone["faces"][0][key]
    np.testing.assert_allclose(batch[3]["faces"][0]["embedding"], alone["faces"][0]["embedding"], atol=1e-5)
    assert batch[3]["faces"][0]["liveness"]["score"] == pytest.approx(alone["faces"][0]["liveness"]["score"], abs=1e-5)
    assert isinstance(batch[0], dict)


def test_analyze_raises_what_analyze_many_returns(pipeline):
    with pytest.raises(InvalidInput, match="empty"):
        pipeline.analyze(b"")
    with pytest.raises(InvalidInput, match="2 images but 1 option"):
        pipeline.analyze_many([b"", b""], [None])


def test_batched_embeddings_run_once(pipeline, read, monkeypatch):
    calls = []
    original = pipeline.embedder.embed
    monkeypatch.setattr(pipeline.embedder, "embed", lambda faces: calls.append(len(faces)) or original(faces))
    results = pipeline.analyze_many([read(OBAMA_1), read(SELFIE), read(JOLIE)], [{"liveness": False}] * 3)
    assert calls == [sum(len(r["faces"]) for r in results)]


# -- bad inputs from the shared data ----------------------------------------

BAD_IMAGES = [
    "bad/cmyk_no_face.jpg",
    "bad/empty.jpg",
    "bad/huge_dims_100000x100000.png",
    "bad/png_named_as.jpg",
    "bad/random_bytes.jpg",
    "bad/truncated.jpg",
]
MESSAGES = {
    "bad/empty.jpg": "payload is empty",
    "bad/random_bytes.jpg": "not a JPEG, PNG, WebP or BMP image",
    "bad/truncated.jpg": "truncated JPEG",
    "bad/huge_dims_100000x100000.png": "IDENT_MAX_PIXELS",
}


def test_every_bad_image_file_is_covered(labelled_files):
    listed = {p for p, e in labelled_files.items() if e["category"] == "bad_input" and p.endswith((".jpg", ".png"))}
    assert listed == set(BAD_IMAGES)


@pytest.mark.parametrize("path", BAD_IMAGES)
def test_bad_inputs_get_their_labelled_behaviour(path, pipeline, read, labelled_files):
    labels = labelled_files[path]["labels"]
    start = time.perf_counter()
    if labels["expected"].startswith("reject"):
        with pytest.raises(InvalidInput) as caught:
            pipeline.analyze(read(path))
        assert MESSAGES[path] in str(caught.value)
        if "huge" in path:
            assert isinstance(caught.value, LimitExceeded)
    else:
        # "decode ... and return 0 faces, or reject cleanly": we decode.
        result = pipeline.analyze(read(path))
        assert len(result["faces"]) == labels["face_count"]
    assert time.perf_counter() - start < 2.0


# -- verify -----------------------------------------------------------------


def test_verify_same_and_different_person(pipeline, read, vision_specs):
    same = pipeline.verify(read(OBAMA_1), read(OBAMA_2))
    assert same["same_person"] is True and same["similarity"] > same["threshold"]
    assert same["model"] == vision_specs["face_embedding"].key
    assert set(same) == {"similarity", "same_person", "threshold", "model", "face_a", "face_b", "timings_ms"}
    assert set(same["face_a"]) == {"bbox", "score"}
    assert _plain(same)
    different = pipeline.verify(read(OBAMA_1), read(JOLIE))
    assert different["same_person"] is False and different["similarity"] < different["threshold"]


def test_verify_uses_the_largest_face(pipeline, read, analyses):
    result = pipeline.verify(read(SELFIE), read(OBAMA_1))
    assert result["face_a"]["bbox"] == analyses[SELFIE]["faces"][0]["bbox"]


def test_verify_errors_name_the_image(pipeline, read):
    with pytest.raises(NoFaceFound, match="no face found in image_b"):
        pipeline.verify(read(OBAMA_1), read(COFFEE))
    with pytest.raises(InvalidInput, match="^image_a: payload is empty"):
        pipeline.verify(b"", read(OBAMA_1))


def test_settings_threshold_overrides_the_catalog(vision_sessions, vision_specs, vision_settings, read):
    strict = VisionPipeline(vision_sessions, vision_specs, dataclasses.replace(vision_settings, face_match_threshold=0.99))
    result = strict.verify(read(OBAMA_1), read(OBAMA_2))
    assert result["threshold"] == 0.99 and result["same_person"] is False


# -- drawing and logs -------------------------------------------------------


def test_draw_result_marks_the_faces(decoded, analyses):
    image = decoded[SELFIE]
    before = image.copy()
    out = draw_result(image, analyses[SELFIE])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, before)
    x1, y1, x2, y2 = (int(v) for v in analyses[SELFIE]["faces"][0]["bbox"])
    assert not np.array_equal(out[y1 : y2 + 1, x1 : x2 + 1], image[y1 : y2 + 1, x1 : x2 + 1])
    assert np.array_equal(draw_result(image, {"faces": []}), image)


def test_draw_file_writes_the_annotated_picture(read, analyses, decoded, tmp_path):
    out = tmp_path / "drawn.png"
    draw_file(read(SELFIE), analyses[SELFIE], out)
    written = cv2.imread(str(out))
    assert np.array_equal(written, draw_result(decoded[SELFIE], analyses[SELFIE]))
    with pytest.raises(InvalidInput, match=r"\.jpg, \.png"):
        draw_file(read(SELFIE), analyses[SELFIE], tmp_path / "drawn.xyz")


def test_logs_carry_no_biometrics(pipeline, read, caplog):
    with caplog.at_level(logging.DEBUG, logger="workers.vision"):
        result = pipeline.analyze(read(OBAMA_1))
    face = result["faces"][0]
    text = caplog.text
    for number in face["embedding"][:5] + [face["landmarks"][0][0]]:
        assert repr(number) not in text and f"{number:.3f}" not in text


def test_a_time_limit_while_decoding_is_not_called_bad_input(pipeline, read, monkeypatch):
    """The catch-all for decoder bugs must let the job's soft time limit through: the
    photo may be fine, and InvalidInput would tell its producer never to retry it."""
    from billiard.exceptions import SoftTimeLimitExceeded

    from workers.vision import pipeline as module

    def out_of_time(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(module, "decode_image", out_of_time)
    with pytest.raises(SoftTimeLimitExceeded):
        pipeline.analyze_many([read("images/faces/barack_obama_01.jpg")])
