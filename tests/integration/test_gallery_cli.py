"""`ident gallery` and `ident submit --identify` as an operator runs them: a real fleet, a real database.

One vision worker on its own redis-server, and the embedded PostgreSQL under a
temporary IDENT_DATA_DIR that the worker and every `ident` command share.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from galleries import embedded
from galleries.database import Database
from galleries.store import EmbeddingModel, GalleryStore
from ident.fleet import EmbeddedRedis
from tests.conftest import REPO_ROOT
from tests.integration.fleetkit import Fleet, make_env

pytestmark = pytest.mark.integration

ENROLLED = ("alex_lacamoire", "angelina_jolie", "barack_obama", "jack_dorsey")


@pytest.fixture(scope="module")
def gallery_fleet(models_path, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("gallery-data")
    logs = tmp_path_factory.mktemp("gallery-logs")
    redis = EmbeddedRedis().start()
    fleet = Fleet(redis, make_env(redis, models_path, data_dir=data_dir), logs)
    try:
        embedded.start(data_dir)  # what the worker's first gallery job would do, started while it loads
        fleet.start("vision", "gallery-vision@itest")
        yield fleet
    finally:
        fleet.stop_all()
        redis.cleanup()
        embedded.stop(data_dir)


def ident(fleet: Fleet, *argv: object, timeout: float = 120) -> tuple[int, str, str]:
    """`ident ARGV` in the fleet's environment: (exit code, stdout, stderr with rich's wrapping undone)."""
    env = {**fleet.env, "COLUMNS": "200"}
    completed = subprocess.run([sys.executable, "-m", "ident.cli", *map(str, argv)], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=timeout)
    said = " ".join(completed.stderr.split())
    assert "Traceback" not in said, said
    return completed.returncode, completed.stdout, said


def ident_json(fleet: Fleet, *argv: object, expect: int = 0):
    code, out, said = ident(fleet, *argv, "--json")
    assert code == expect, said
    return json.loads(out)


@pytest.fixture(scope="module")
def people(data_path, tmp_path_factory) -> Path:
    """One subfolder per person, one photo each; one person by file stem; a two-face photo; a text file."""
    folder = tmp_path_factory.mktemp("people")
    faces = data_path / "images" / "faces"
    for person in ("angelina_jolie", "barack_obama", "jack_dorsey"):
        (folder / person).mkdir()
        shutil.copy(faces / f"{person}_01.jpg", folder / person / f"{person}_01.jpg")
    shutil.copy(faces / "alex_lacamoire_01.jpg", folder / "alex_lacamoire_01.jpg")  # subject by stem
    (folder / "group").mkdir()
    shutil.copy(data_path / "images" / "multi_face" / "two_people.jpg", folder / "group" / "two_people.jpg")
    (folder / "notes.txt").write_text("who is who\n")
    (folder / ".hidden.jpg").write_bytes((faces / "joe_biden_02.jpg").read_bytes())
    return folder


def test_enrol_a_folder_identify_forget_export_and_import(gallery_fleet, people, data_path, tmp_path):
    fleet = gallery_fleet
    faces = data_path / "images" / "faces"

    report = ident_json(fleet, "gallery", "enroll", "staff", people, "--concurrency", "2", "--timeout", "60")
    assert (report["files"], report["enrolled"], report["already_enrolled"], report["failed"]) == (5, 4, 0, [])
    assert [group["files"] for group in report["refused"]] == [[str(people / "group" / "two_people.jpg")]]
    assert report["refused"][0]["reason"].startswith("2 faces found")
    assert report["ignored"] == [{"reason": "neither a photo nor a recording", "files": [str(people / "notes.txt")]}]

    # Again: nothing new is sent for the enrolled; the refused photo is refused again, and that is no failure.
    code, out, said = ident(fleet, "gallery", "enroll", "staff", people)
    assert code == 0, said
    assert re.search(r"enrolled\W+0\W", out) and re.search(r"already there\W+4\W", out), out
    assert re.search(r"refused\W+1\W", out) and "2 faces found" in out and "two_people.jpg" in out, out

    listed = ident_json(fleet, "gallery", "list")
    assert listed == [{"name": "staff", "modality": "vision", "model": listed[0]["model"], "subjects": 4,
                       "templates": 4}]

    known, stranger = faces / "barack_obama_02.jpg", faces / "jennifer_aniston_01.jpg"
    answers = ident_json(fleet, "submit", "--identify", "staff", known, stranger)
    assert [a["file"] for a in answers] == [str(known), str(stranger)]
    (obama,), (aniston,) = answers[0]["result"]["faces"], answers[1]["result"]["faces"]
    assert obama["match"] == "barack_obama" and obama["candidates"][0]["subject_id"] == "barack_obama"
    assert {c["subject_id"] for c in obama["candidates"]} == set(ENROLLED)
    assert aniston["match"] is None, aniston["candidates"]
    code, out, said = ident(fleet, "submit", "--identify", "staff", known, stranger)
    assert code == 0, said
    assert re.search(r"barack_obama\s+0\.\d{3}", out) and "barack_obama" in out and "stranger" in out, out

    code, out, said = ident(fleet, "gallery", "forget", "staff", "barack_obama")
    assert code == 0 and "deleted 1 template(s) of 'barack_obama'" in out, said

    exported = tmp_path / "staff.jsonl"
    code, out, said = ident(fleet, "gallery", "export", "staff", exported)
    assert code == 0 and "exported 3 template(s)" in out and "biometric templates" in said, said
    assert len(exported.read_text().splitlines()) == 1 + 3
    code, out, said = ident(fleet, "gallery", "import", "staff-copy", exported)
    assert code == 0 and "imported 3 template(s) into gallery 'staff-copy'" in out, said
    code, out, said = ident(fleet, "gallery", "import", "staff-copy", exported)
    assert code == 0 and "imported 0 template(s)" in out and "3 were there already" in out, said

    # The imported templates are searched like enrolled ones, and the forgotten subject is not among them.
    answers = ident_json(fleet, "submit", "--identify", "staff-copy", faces / "angelina_jolie_02.jpg", known)
    (jolie,), (forgotten,) = (answer["result"]["faces"] for answer in answers)
    assert jolie["match"] == "angelina_jolie"
    assert forgotten["match"] != "barack_obama"
    assert {c["subject_id"] for c in forgotten["candidates"]} == set(ENROLLED) - {"barack_obama"}


def test_typed_errors_and_failed_jobs(gallery_fleet, data_path, tmp_path):
    fleet = gallery_fleet
    code, _out, said = ident(fleet, "gallery", "stats", "no-such-gallery")
    assert code == 2 and "GalleryNotFound: gallery 'no-such-gallery' does not exist" in said
    code, _out, said = ident(fleet, "submit", "--identify", "no-such-gallery",
                             data_path / "images" / "faces" / "joe_biden_02.jpg")
    assert code == 1 and "GalleryNotFound:" in said
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _out, said = ident(fleet, "gallery", "enroll", "staff", empty)
    assert code == 2 and "IdentError: no photos or recordings found under" in said
    # No audio worker runs: the job is never answered, so it fails, and the run exits 1.
    voices = tmp_path / "voices"
    voices.mkdir()
    shutil.copy(data_path / "audio" / "speakers" / "fsdd_george_01.wav", voices / "george.wav")
    report = ident_json(fleet, "gallery", "enroll", "voices", voices, "--timeout", "1", expect=1)
    assert report["kind"] == "audio" and report["enrolled"] == 0
    assert report["failed"][0]["error"] == "Timeout" and report["failed"][0]["files"] == [str(voices / "george.wav")]
    # A gallery of faces takes no recordings: refused before anything is sent.
    store = GalleryStore(Database("", fleet.settings.data_dir))
    try:
        store.enroll("faces-only", "someone", np.ones(4, np.float32),
                     EmbeddingModel("some_face_model", "f" * 64, 4, "vision"), "sha256:" + "0" * 64)
    finally:
        store.database.close()
    code, _out, said = ident(fleet, "gallery", "enroll", "faces-only", voices)
    assert code == 2 and "GalleryMismatch: gallery 'faces-only' holds vision templates" in said
