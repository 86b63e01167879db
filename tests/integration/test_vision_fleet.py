"""vision.analyze and vision.verify through the real queue, on the labelled photos."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _face_images(labelled_files):
    for path, entry in sorted(labelled_files.items()):
        if entry["category"] in ("face", "face_liveness", "multi_face", "no_face"):
            yield path, entry["labels"]


def test_analyze_counts_faces_within_the_labelled_ranges(fleet, client, data_path, labelled_files):
    jobs = [(path, labels, client.analyze_image((data_path / path).read_bytes()))
            for path, labels in _face_images(labelled_files)]
    for path, labels, pending in jobs:
        result = pending.get(timeout=120)
        low = labels.get("face_count_min", labels["face_count"])
        high = labels.get("face_count_max", labels["face_count"])
        assert low <= len(result["faces"]) <= high, path
        assert result["execution_provider"] and result["device"] and result["models"]
        assert result["image"]["width"] > 0 and result["image"]["height"] > 0
        areas = [(f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]) for f in result["faces"]]
        assert areas == sorted(areas, reverse=True), "largest face first"
        for face in result["faces"]:
            assert len(face["landmarks"]) == 5 and len(face["embedding"]) == 128
            assert 0.0 <= face["liveness"]["score"] <= 1.0
        if labels.get("liveness") in ("real", "spoof"):
            assert result["faces"][0]["liveness"]["is_live"] is (labels["liveness"] == "real"), path


def test_options_are_honoured(fleet, client, data_path):
    image = (data_path / "images" / "multi_face" / "selfie_many_people.jpg").read_bytes()
    result = client.analyze_image(image, {"max_faces": 2, "embed": False, "liveness": False}).get(timeout=60)
    assert len(result["faces"]) == 2
    assert all(f["embedding"] is None and f["liveness"] is None for f in result["faces"])
    with pytest.raises(Exception) as refused:
        client.analyze_image(image, {"max_fcaes": 2}).get(timeout=60)
    assert type(refused.value).__name__ == "InvalidInput" and "max_fcaes" in str(refused.value)


def test_verify_separates_people(fleet, client, data_path, labels):
    same = labels["pairs"]["face_same_person"][:4]
    different = labels["pairs"]["face_different_person"][:8]
    pending = [(True, client.verify_faces((data_path / a).read_bytes(), (data_path / b).read_bytes()))
               for a, b in same]
    pending += [(False, client.verify_faces((data_path / a).read_bytes(), (data_path / b).read_bytes()))
                for a, b in different]
    for expected, result in pending:
        answer = result.get(timeout=120)
        assert answer["same_person"] is expected
        assert answer["threshold"] > 0 and answer["execution_provider"]


def test_verify_without_a_face_says_which_image(fleet, client, data_path):
    face = (data_path / "images" / "faces" / "joe_biden_01.jpg").read_bytes()
    rocket = (data_path / "images" / "no_face" / "rocket.jpg").read_bytes()
    with pytest.raises(Exception) as refused:
        client.verify_faces(face, rocket).get(timeout=60)
    assert type(refused.value).__name__ == "NoFaceFound"
    assert "image_b" in str(refused.value)


@pytest.mark.parametrize("name,args", [("vision.analyze", []), ("vision.verify", [b"only one image"])])
def test_wrong_arguments_are_invalid_input(fleet, client, name, args):
    """A producer that sends the wrong arguments learns it from a typed error, not a TypeError."""
    with pytest.raises(Exception) as refused:
        client.app.send_task(name, args=args).get(timeout=60)
    assert type(refused.value).__name__ == "InvalidInput"
    assert "bad arguments" in str(refused.value)


def test_ident_submit_prints_and_draws(fleet, fleet_env, data_path, tmp_path):
    photo = data_path / "images" / "multi_face" / "two_people.jpg"
    drawn = tmp_path / "drawn.png"
    completed = subprocess.run(
        [sys.executable, "-m", "ident.cli", "submit", str(photo), "--draw", str(drawn)],
        env=fleet_env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "<128 floats>" in completed.stdout and "execution_provider" in completed.stdout
    assert drawn.read_bytes()[:4] == b"\x89PNG"
    full = subprocess.run(
        [sys.executable, "-m", "ident.cli", "submit", str(photo), "--full"],
        env=fleet_env, capture_output=True, text=True, timeout=120,
    )
    body = json.loads(full.stdout[full.stdout.index("{"):])
    assert len(body["faces"][0]["embedding"]) == 128
