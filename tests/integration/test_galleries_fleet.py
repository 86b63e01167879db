"""Galleries through the real queue: enrol, identify and forget faces and voices on real workers and a real PostgreSQL.

The session's fleet (tests/integration/conftest.py) has a vision worker with
two pool processes and an audio worker; their embedded PostgreSQL starts
under the session's IDENT_DATA_DIR on the first gallery job. Every photo and
recording is from ../shared/data; people and voices not enrolled play the
strangers who must get ``match: null``.
"""

from __future__ import annotations

import time
import uuid

import cv2
import pytest

from galleries import embedded
from ident.fleet import EmbeddedRedis, start_worker, wait_until_ready
from tasks.client import IdentClient
from tasks.settings import Settings
from tests.integration.fleetkit import make_env, outcome

pytestmark = pytest.mark.integration

FACES = "images/faces"
ENROLLED_PEOPLE = ("barack_obama", "joe_biden", "angelina_jolie", "jack_dorsey")
STRANGER_PHOTOS = ("jennifer_aniston_01.jpg", "alex_lacamoire_01.jpg")
ENROLLED_SPEAKERS = ("librispeech_1688", "librispeech_1998", "librispeech_2414")
STRANGER_VOICE = "audio/speakers/librispeech_533_01.wav"


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _photo(data_path, name: str) -> bytes:
    return (data_path / FACES / name).read_bytes()


def _voice(data_path, speaker: str, take: int) -> bytes:
    folder = data_path / "audio" / "speakers"
    (path,) = [p for p in folder.iterdir() if p.stem == f"{speaker}_{take:02d}"]
    return path.read_bytes()


@pytest.fixture(scope="module")
def face_gallery(fleet, client, data_path):
    """A gallery of four people, one photo each (their _01 photo)."""
    gallery = _name("people")
    pending = [client.enroll("vision", gallery, person, _photo(data_path, f"{person}_01.jpg"))
               for person in ENROLLED_PEOPLE]
    results = [p.get(timeout=120) for p in pending]
    for person, result in zip(ENROLLED_PEOPLE, results):
        assert result["subject_id"] == person and result["templates"] == 1 and result["gallery"] == gallery
        assert result["model"] == "arcface_mobilefacenet" and result["execution_provider"]
    return gallery


def test_enrolled_people_are_identified_from_other_photos(client, data_path, face_gallery):
    for person in ENROLLED_PEOPLE:
        result = client.identify("vision", face_gallery, _photo(data_path, f"{person}_02.jpg")).get(timeout=120)
        (face,) = result["faces"]
        assert face["match"] == person, (person, face["candidates"])
        assert face["candidates"][0]["subject_id"] == person
        assert face["candidates"][0]["score"] >= result["threshold"]
        scores = [c["score"] for c in face["candidates"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == len(ENROLLED_PEOPLE)
        assert result["execution_provider"] and result["timings_ms"]["search"] >= 0
        assert result["threshold_basis"] == {"source": "target_fpir", "target_fpir": 0.01,
                                             "templates": len(ENROLLED_PEOPLE)}


def test_strangers_get_no_match(client, data_path, face_gallery):
    for photo in STRANGER_PHOTOS:
        result = client.identify("vision", face_gallery, _photo(data_path, photo)).get(timeout=120)
        (face,) = result["faces"]
        assert face["match"] is None, (photo, face["candidates"])
        assert face["candidates"], "a stranger still gets the nearest candidates, below the threshold"


def test_every_face_of_a_group_photo_is_searched(client, data_path, face_gallery):
    group = (data_path / "images" / "multi_face" / "selfie_many_people.jpg").read_bytes()
    result = client.identify("vision", face_gallery, group, {"top_k": 2}).get(timeout=120)
    assert len(result["faces"]) >= 2
    for face in result["faces"]:
        assert len(face["bbox"]) == 4 and len(face["candidates"]) == 2 and "match" in face


def test_thresholds_per_call_and_per_gallery(client, data_path, face_gallery, gallery_data_dir):
    from galleries.database import Database
    from galleries.store import GalleryStore

    probe = _photo(data_path, "barack_obama_02.jpg")
    default = client.identify("vision", face_gallery, probe).get(timeout=120)["threshold"]
    store = GalleryStore(Database("", gallery_data_dir))
    store.set_threshold(face_gallery, 0.97)
    try:
        own = client.identify("vision", face_gallery, probe).get(timeout=120)
        assert own["threshold"] == pytest.approx(0.97) and own["faces"][0]["match"] is None
        asked = client.identify("vision", face_gallery, probe, {"threshold": default}).get(timeout=120)
        assert asked["faces"][0]["match"] == "barack_obama", "the call's threshold wins over the gallery's"
    finally:
        store.set_threshold(face_gallery, None)
        store.database.close()
    strict = client.identify("vision", face_gallery, probe, {"threshold": 0.99}).get(timeout=120)
    assert strict["threshold"] == 0.99 and strict["faces"][0]["match"] is None
    lax = client.identify("vision", face_gallery, _photo(data_path, STRANGER_PHOTOS[0]),
                          {"threshold": -1}).get(timeout=120)
    assert lax["faces"][0]["match"] is not None


def test_forget_deletes_the_subject(client, data_path):
    gallery = _name("forget")
    for take in ("01", "02"):
        client.enroll("vision", gallery, "joe_biden", _photo(data_path, f"joe_biden_{take}.jpg")).get(timeout=120)
    client.enroll("vision", gallery, "barack_obama", _photo(data_path, "barack_obama_01.jpg")).get(timeout=120)
    assert client.forget("vision", gallery, "joe_biden").get(timeout=60)["deleted"] == 2
    assert client.forget("vision", gallery, "joe_biden").get(timeout=60)["deleted"] == 0
    result = client.identify("vision", gallery, _photo(data_path, "joe_biden_02.jpg")).get(timeout=120)
    assert [c["subject_id"] for c in result["faces"][0]["candidates"]] == ["barack_obama"]
    assert result["faces"][0]["match"] is None


def test_same_photo_twice_is_one_template(client, data_path):
    gallery = _name("idempotent")
    photo = _photo(data_path, "angelina_jolie_01.jpg")
    first = client.enroll("vision", gallery, "angelina", photo).get(timeout=120)
    second = client.enroll("vision", gallery, "angelina", photo).get(timeout=120)
    assert (first["templates"], first["already_enrolled"]) == (1, False)
    assert (second["templates"], second["already_enrolled"]) == (1, True)


def test_concurrent_enrolment_across_pool_processes(client, data_path):
    gallery = _name("concurrent")
    photos = sorted(p.name for p in (data_path / FACES).iterdir())
    pending = [client.enroll("vision", gallery, f"subject-{i}", (data_path / FACES / name).read_bytes(),
                             {"liveness": False})
               for i, name in enumerate(photos)]
    outcomes = [outcome(p, 180) for p in pending]
    assert all(ok for ok, _ in outcomes), [value for ok, value in outcomes if not ok]
    results = [value for _, value in outcomes]
    assert len({r["worker"]["pid"] for r in results}) == 2, "both pool processes enrolled"
    assert {r["templates"] for r in results} == {1}
    found = client.identify("vision", gallery, _photo(data_path, photos[0]), {"top_k": 100}).get(timeout=120)
    assert len(found["faces"][0]["candidates"]) == len(photos)


def _refusal(result) -> Exception:
    with pytest.raises(Exception) as caught:
        result.get(timeout=120)
    return caught.value


def test_enrolment_refusals_say_why(client, data_path):
    gallery = _name("refusals")
    images = data_path / "images"
    group = _refusal(client.enroll("vision", gallery, "x", (images / "multi_face" / "selfie_many_people.jpg")
                                   .read_bytes()))
    assert type(group).__name__ == "EnrollmentRefused" and "faces found of a similar size" in str(group)
    assert str(group).split()[0].isdigit() and int(str(group).split()[0]) > 1
    no_face = next(p for p in (images / "no_face").iterdir())
    nothing = _refusal(client.enroll("vision", gallery, "x", no_face.read_bytes()))
    assert type(nothing).__name__ == "EnrollmentRefused" and "no face" in str(nothing)
    spoof = _refusal(client.enroll("vision", gallery, "x", (images / "liveness" / "spoof_hyperfas_screen.png")
                                   .read_bytes()))
    assert type(spoof).__name__ == "EnrollmentRefused" and "liveness says spoof" in str(spoof)
    # The same real photo shrunk until its face is about 30 px: found, but too small to enrol.
    photo = cv2.imread(str(images / "faces" / "barack_obama_01.jpg"))
    face = client.analyze_image(_photo(data_path, "barack_obama_01.jpg"), {"liveness": False}).get(timeout=120)
    x1, y1, x2, y2 = face["faces"][0]["bbox"]
    scale = 30.0 / min(x2 - x1, y2 - y1)
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    padded = cv2.copyMakeBorder(small, 80, 80, 80, 80, cv2.BORDER_REPLICATE)
    tiny = _refusal(client.enroll("vision", gallery, "x", cv2.imencode(".jpg", padded)[1].tobytes()))
    assert type(tiny).__name__ == "EnrollmentRefused" and "too small" in str(tiny), tiny
    # A refusal stores nothing, not even the gallery.
    missing = _refusal(client.identify("vision", gallery, _photo(data_path, "barack_obama_02.jpg")))
    assert type(missing).__name__ == "GalleryNotFound"


@pytest.mark.parametrize("gallery, subject, named", [
    ("", "a", "gallery name"), ("g", "", "subject_id"), ("g" * 129, "a", "gallery name"),
    ("g", "a\nb", "subject_id"), ("g\x00", "a", "gallery name"), ("g", "x" * 129, "subject_id"),
    ("g", "\u202eabc", "subject_id"), (7, "a", "gallery name"),
])
def test_bad_names_are_refused(client, data_path, gallery, subject, named):
    error = _refusal(client.enroll("vision", gallery, subject, _photo(data_path, "joe_biden_01.jpg")))
    assert type(error).__name__ == "InvalidInput" and named in str(error), error


def test_unknown_gallery_and_wrong_modality(client, data_path, face_gallery):
    for pending in (client.identify("vision", _name("nowhere"), _photo(data_path, "joe_biden_02.jpg")),
                    client.forget("vision", _name("nowhere"), "someone")):
        assert type(_refusal(pending)).__name__ == "GalleryNotFound"
    voice = _voice(data_path, "librispeech_1688", 1)
    wrong = _refusal(client.identify("audio", face_gallery, voice))
    assert type(wrong).__name__ == "GalleryMismatch" and "vision" in str(wrong)


def test_voices_enrol_identify_and_strangers(client, data_path):
    gallery = _name("voices")
    for speaker in ENROLLED_SPEAKERS:
        result = client.enroll("audio", gallery, speaker, _voice(data_path, speaker, 1)).get(timeout=180)
        assert result["templates"] == 1 and result["model"] and result["execution_provider"]
    for speaker in ENROLLED_SPEAKERS:
        result = client.identify("audio", gallery, _voice(data_path, speaker, 2)).get(timeout=180)
        assert result["match"] == speaker, (speaker, result["candidates"])
        assert result["speech_s"] > 1
    stranger = client.identify("audio", gallery, (data_path / STRANGER_VOICE).read_bytes()).get(timeout=180)
    assert stranger["match"] is None, stranger["candidates"]
    assert client.forget("audio", gallery, ENROLLED_SPEAKERS[0]).get(timeout=60)["deleted"] == 1


def test_voice_enrolment_refusals(client, data_path):
    gallery = _name("voice-refusals")
    short = _refusal(client.enroll("audio", gallery, "george", (data_path / "audio" / "speakers" /
                                                               "fsdd_george_01.wav").read_bytes()))
    assert type(short).__name__ == "EnrollmentRefused" and "IDENT_GALLERY_MIN_SPEECH_S" in str(short)
    synthetic = _refusal(client.enroll("audio", gallery, "robot", (data_path / "audio" / "antispoof" / "spoof" /
                                                                  "espeak_en-us.wav").read_bytes()))
    assert type(synthetic).__name__ == "EnrollmentRefused" and "bona fide" in str(synthetic), synthetic
    silence = _refusal(client.enroll("audio", gallery, "nobody", (data_path / "audio" / "nonspeech" /
                                                                 "digital_silence_3s_16k.wav").read_bytes()))
    assert type(silence).__name__ == "EnrollmentRefused"


def test_database_away_and_back(models_path, data_path, logs_dir, tmp_path):
    """A worker whose database goes away fails gallery jobs with GalleryUnavailable, serves the rest, and recovers."""
    data_dir = tmp_path / "own-db"
    url = embedded.start(data_dir)
    redis = EmbeddedRedis().start()
    worker = None
    try:
        env = make_env(redis, models_path, gallery_url=url, data_dir=tmp_path / "unused")
        worker = start_worker("vision", env, concurrency=1, name="vision-db@itest", log_dir=logs_dir)
        own = IdentClient(Settings.from_env(env))
        wait_until_ready(own.app, [worker], timeout=180)
        photo = _photo(data_path, "joe_biden_01.jpg")
        assert own.enroll("vision", "door", "joe", photo).get(timeout=120)["templates"] == 1

        embedded.stop(data_dir)
        error = _refusal(own.identify("vision", "door", _photo(data_path, "joe_biden_02.jpg")))
        assert type(error).__name__ == "GalleryUnavailable" and "unreachable" in str(error), error
        assert own.analyze_image(photo).get(timeout=120)["faces"], "the worker keeps serving other jobs"
        status = own.status("vision").get(timeout=60)
        assert status["galleries"]["state"] == "unavailable" and "unreachable" in status["galleries"]["problem"]

        assert embedded.start(data_dir) == url
        # The next gallery job reconnects: no restart, no waiting.
        back = own.identify("vision", "door", _photo(data_path, "joe_biden_02.jpg")).get(timeout=120)
        assert back["faces"][0]["match"] == "joe", back
        assert own.status("vision").get(timeout=60)["galleries"]["state"] == "connected"
        assert worker.process.poll() is None
    finally:
        if worker is not None:
            worker.stop()
        redis.cleanup()
        embedded.stop(data_dir)


def test_an_indexed_gallery_is_searched_through_the_workers_shortlist(models_path, data_path, logs_dir, tmp_path):
    """Past IDENT_GALLERY_INDEX_MIN_TEMPLATES a real worker builds its shortlist and answers through it, as before."""
    redis = EmbeddedRedis().start()
    worker = None
    try:
        env = make_env(redis, models_path, data_dir=tmp_path / "data", gallery_index_min_templates=3)
        worker = start_worker("vision", env, concurrency=1, name="vision-shortlist@itest", log_dir=logs_dir)
        own = IdentClient(Settings.from_env(env))
        wait_until_ready(own.app, [worker], timeout=180)
        gallery = _name("indexed")
        for person in ENROLLED_PEOPLE:
            own.enroll("vision", gallery, person, _photo(data_path, f"{person}_01.jpg")).get(timeout=120)

        def answers() -> list:
            found = []
            for photo in [f"{person}_02.jpg" for person in ENROLLED_PEOPLE] + list(STRANGER_PHOTOS):
                (face,) = own.identify("vision", gallery, _photo(data_path, photo)).get(timeout=120)["faces"]
                found.append((face["match"], [(c["subject_id"], round(c["score"], 5)) for c in face["candidates"]]))
            return found

        # The first search starts the pool process's shortlist; until it is built, HNSW answers.
        through_hnsw = answers()
        assert [match for match, _ in through_hnsw] == [*ENROLLED_PEOPLE, None, None], through_hnsw
        deadline = time.monotonic() + 60
        while True:
            shortlists = own.status("vision").get(timeout=60)["galleries"]["shortlists"]
            if shortlists.get(gallery, {}).get("state") == "ready" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert shortlists[gallery]["state"] == "ready", shortlists
        assert shortlists[gallery]["templates"] == len(ENROLLED_PEOPLE) and shortlists[gallery]["bytes"] > 0
        assert answers() == through_hnsw, "the shortlist's answers are the same, scores to 5 decimals"

        # Enrolled and forgotten after the copy was made: counted, and gone, at once.
        own.enroll("vision", gallery, "jennifer_aniston", _photo(data_path, "jennifer_aniston_02.jpg")).get(timeout=120)
        probe = _photo(data_path, "jennifer_aniston_01.jpg")
        assert own.identify("vision", gallery, probe).get(timeout=120)["faces"][0]["match"] == "jennifer_aniston"
        assert own.forget("vision", gallery, "jennifer_aniston").get(timeout=60)["deleted"] == 1
        after = own.identify("vision", gallery, probe).get(timeout=120)["faces"][0]
        assert after["match"] is None and "jennifer_aniston" not in [c["subject_id"] for c in after["candidates"]]
    finally:
        if worker is not None:
            worker.stop()
        redis.cleanup()
        embedded.stop(tmp_path / "data")
