"""ArcFace embeddings and the identity decision on the labelled face pairs."""

from __future__ import annotations

import numpy as np
import pytest

from face_pairs import accuracy, all_pair_scores, auc, extra_faces, pair_scores
from models.catalog import ARCFACE_TEMPLATE_112, get_spec
from tasks.errors import InvalidInput
from workers.vision.align import align_faces
from workers.vision.arcface import ArcFace, arcface_blob, unit_rows


@pytest.fixture(scope="module")
def arcface(cpu_session_factory, embedding_spec):
    return ArcFace(cpu_session_factory(embedding_spec.filename), embedding_spec)


@pytest.fixture(scope="module")
def aligned(decoded, analyses):
    faces = []
    for path in ("images/faces/barack_obama_01.jpg", "images/faces/angelina_jolie_01.jpg", "images/multi_face/two_people.jpg"):
        marks = np.array([f["landmarks"] for f in analyses[path]["faces"]])
        faces.append(align_faces(decoded[path], marks, ARCFACE_TEMPLATE_112))
    return np.concatenate(faces)


def test_embeddings_are_unit_float32_of_the_model_dimension(arcface, aligned):
    out = arcface.embed(aligned)
    assert out.dtype == np.float32 and out.shape == (len(aligned), 128)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert arcface.dim == 128


def test_batch_equals_one_by_one(arcface, aligned):
    together = arcface.embed(aligned)
    alone = np.concatenate([arcface.embed(face[None]) for face in aligned])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_wrong_shapes_are_refused(arcface):
    with pytest.raises(InvalidInput, match="112"):
        arcface.embed(np.zeros((2, 100, 100, 3), np.uint8))
    assert arcface.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape[0] == 0


@pytest.fixture(scope="module")
def scores(analyses, labels):
    return pair_scores(analyses, labels)


def test_every_same_person_pair_beats_every_different_person_pair(scores):
    lowest_same = min(scores.same, key=lambda t: t[2])
    highest_different = max(scores.different, key=lambda t: t[2])
    assert lowest_same[2] > highest_different[2], (lowest_same, highest_different)
    assert auc(scores.same_scores, scores.different_scores) == 1.0


def test_catalog_threshold_separates_the_pairs_with_margin(scores, pipeline):
    threshold = get_spec("arcface_mobilefacenet").params["match_threshold"]
    assert pipeline.match_threshold == threshold
    assert accuracy(scores, threshold) == 1.0
    # A threshold hugging either cloud would not survive new people.
    assert scores.different_scores.max() + 0.05 <= threshold <= scores.same_scores.min() - 0.05


def test_widening_photos_name_their_people_by_file_name():
    # The --extra check of face_pairs.py: a "<person>__" photo is that person's
    # largest face only; in any other photo each face is somebody new.
    faces = {"faces": [{"embedding": [1.0, 0.0]}, {"embedding": [0.6, 0.8]}]}
    found = extra_faces({"extra/group.jpg": faces, "extra/barack_obama__b.jpg": faces, "extra/barack_obama__a.jpg": faces})
    assert [person for person, _, _ in found] == ["barack_obama", "barack_obama", "group.jpg#0", "group.jpg#1"]
    scores = all_pair_scores(found)
    assert [round(s, 3) for _, _, s in scores.same] == [1.0]
    assert sorted(round(s, 3) for _, _, s in scores.different) == [0.6, 0.6, 0.6, 1.0, 1.0]


def test_the_blob_is_rgb_centred_and_channels_first():
    face = np.zeros((1, 112, 112, 3), np.uint8)
    face[..., 0] = 255  # blue, in OpenCV's BGR order
    blob = arcface_blob(face, rgb=True, mean=127.5, std=127.5)
    assert blob.shape == (1, 3, 112, 112) and blob.dtype == np.float32 and blob.flags.c_contiguous
    np.testing.assert_allclose(blob[0, :, 0, 0], [-1.0, -1.0, 1.0])  # R, G, B
    bgr = arcface_blob(face, rgb=False, mean=0.0, std=1.0)
    np.testing.assert_allclose(bgr[0, :, 0, 0], [255.0, 0.0, 0.0])


def test_unit_rows_leave_a_zero_row_zero():
    out = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
