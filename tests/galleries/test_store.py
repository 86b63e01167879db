"""GalleryStore against a real PostgreSQL with pgvector: enrol, identify, forget, and what operators read."""

from __future__ import annotations

import multiprocessing
import queue
import time
from datetime import datetime

import numpy as np
import psycopg
import pytest
from psycopg import sql as pgsql

from galleries import migrations
from galleries.database import Database
from galleries.store import Candidate, GalleryStore
from tasks.errors import ConfigurationError, GalleryMismatch, GalleryNotFound, InvalidInput

from .conftest import FACE, FACE_RETRAINED, VOICE, cosine, near, rows_in, table_of, unit_vectors, url_for_database


# -- enrol, identify, forget -------------------------------------------------


def test_enrol_identify_forget(store, names, direct, rng):
    gallery = names()
    alice, bob = unit_vectors(rng, 2)
    first = store.enroll(gallery, "alice", alice, FACE, "photo-1")
    assert (first.templates, first.added) == (1, True)
    assert (first.gallery.name, first.gallery.modality, first.gallery.model) == (gallery, "vision", FACE.key)
    assert (first.gallery.dimensions, first.gallery.indexed, first.gallery.threshold) == (128, False, None)
    store.enroll(gallery, "bob", bob, FACE, "photo-1")

    probe = near(alice, rng)
    found, (candidates,) = store.identify(gallery, [probe], FACE)
    assert found.id == first.gallery.id
    assert [c.subject_id for c in candidates] == ["alice", "bob"]
    assert candidates[0].score == pytest.approx(cosine(probe, alice), abs=1e-5)
    assert candidates[1].score == pytest.approx(cosine(probe, bob), abs=1e-5)

    assert store.forget(gallery, "alice", "vision") == 1
    assert rows_in(direct, gallery, "alice") == 0
    assert rows_in(direct, gallery) == 1
    _, (after,) = store.identify(gallery, [probe], FACE)
    assert [c.subject_id for c in after] == ["bob"]
    assert store.forget(gallery, "alice", "vision") == 0  # forgetting twice is not an error


def test_a_subject_scores_by_its_best_template(store, names, rng):
    gallery = names()
    carol = unit_vectors(rng, 3)  # three unrelated captures of one subject
    dave = unit_vectors(rng, 1)[0]
    for i, template in enumerate(carol):
        assert store.enroll(gallery, "carol", template, FACE, f"c{i}").templates == i + 1
    store.enroll(gallery, "dave", dave, FACE, "d0")

    for i in range(3):
        probe = near(carol[i], rng)
        _, (candidates,) = store.identify(gallery, [probe], FACE, top_k=5)
        # One row per subject, however many templates it has; carol's score is her closest template's.
        assert [c.subject_id for c in candidates] == ["carol", "dave"]
        best = max(cosine(probe, t) for t in carol)
        assert best == pytest.approx(cosine(probe, carol[i]))
        assert candidates[0].score == pytest.approx(best, abs=1e-5)
        assert candidates[1].score == pytest.approx(cosine(probe, dave), abs=1e-5)


def test_top_k_and_several_probes(store, names, rng):
    gallery = names()
    templates = unit_vectors(rng, 12)
    for i, template in enumerate(templates):
        store.enroll(gallery, f"s{i:02d}", template, FACE, "src")
    probes = [near(templates[3], rng), near(templates[7], rng), unit_vectors(rng, 1)[0]]

    _, results = store.identify(gallery, probes, FACE, top_k=5)
    assert len(results) == 3
    for probe, candidates in zip(probes, results):
        expected = sorted(((cosine(probe, t), f"s{i:02d}") for i, t in enumerate(templates)), reverse=True)[:5]
        assert [c.subject_id for c in candidates] == [name for _, name in expected]
        assert [c.score for c in candidates] == pytest.approx([score for score, _ in expected], abs=1e-5)
    assert results[0][0].subject_id == "s03" and results[1][0].subject_id == "s07"

    _, (one,) = store.identify(gallery, probes[:1], FACE, top_k=1)
    assert [c.subject_id for c in one] == ["s03"]
    _, (every,) = store.identify(gallery, probes[:1], FACE, top_k=100)
    assert sorted(c.subject_id for c in every) == [f"s{i:02d}" for i in range(12)]
    _, none = store.identify(gallery, [], FACE)
    assert none == []

    for bad in (0, 101, -1, True, 2.5, "5", None):
        with pytest.raises(InvalidInput, match="option 'top_k' must be a whole number from 1 to 100"):
            store.identify(gallery, probes, FACE, top_k=bad)


def test_enrolment_is_idempotent_per_subject_and_source(store, names, direct, rng):
    gallery = names()
    photo, other = unit_vectors(rng, 2)
    assert store.enroll(gallery, "erin", photo, FACE, "sha-a").added
    again = store.enroll(gallery, "erin", photo, FACE, "sha-a")  # the same job delivered twice
    assert (again.added, again.templates) == (False, 1)
    # Even with another embedding, the same (subject, source) is the same template: the first one stays.
    changed = store.enroll(gallery, "erin", other, FACE, "sha-a")
    assert (changed.added, changed.templates) == (False, 1)
    assert rows_in(direct, gallery) == 1
    _, (candidates,) = store.identify(gallery, [photo], FACE, top_k=1)
    assert candidates[0].score == pytest.approx(1.0, abs=1e-6)

    second = store.enroll(gallery, "erin", other, FACE, "sha-b")
    assert (second.added, second.templates) == (True, 2)
    # The same photo enrolled for another subject is that subject's template.
    assert store.enroll(gallery, "frank", photo, FACE, "sha-a").added
    assert rows_in(direct, gallery) == 3
    assert store.enrolled_sources(gallery) == {("erin", "sha-a"), ("erin", "sha-b"), ("frank", "sha-a")}
    assert store.enrolled_sources(names("never-made")) == set()


def test_a_gallery_that_does_not_exist(store, names, rng):
    missing = names("missing")
    probe = unit_vectors(rng, 1)[0]
    with pytest.raises(GalleryNotFound, match=f"gallery '{missing}' does not exist: enrol a subject into it first"):
        store.identify(missing, [probe], FACE)
    with pytest.raises(GalleryNotFound, match="does not exist"):
        store.forget(missing, "alice", "vision")
    with pytest.raises(GalleryNotFound, match="does not exist"):
        store.stats(missing)
    with pytest.raises(GalleryNotFound, match="does not exist"):
        store.set_threshold(missing, 0.5)
    with pytest.raises(GalleryNotFound, match="does not exist"):
        store.export_rows(missing)
    # Asking did not create it.
    assert missing not in [row["name"] for row in store.galleries()]


def test_modality_and_model_mismatch(store, names, direct, rng):
    gallery = names()
    face = unit_vectors(rng, 1)[0]
    store.enroll(gallery, "alice", face, FACE, "src")
    voice = unit_vectors(rng, 1, VOICE.dimensions)[0]

    with pytest.raises(GalleryMismatch, match="holds vision templates, not audio: use vision.enroll/identify"):
        store.identify(gallery, [voice], VOICE)
    with pytest.raises(GalleryMismatch, match="holds vision templates, not audio"):
        store.enroll(gallery, "alice", voice, VOICE, "voice-src")
    with pytest.raises(GalleryMismatch, match="forget its subjects with vision.forget"):
        store.forget(gallery, "alice", "audio")

    # The same model key from another file (retrained, requantised): its templates cannot be compared.
    assert FACE_RETRAINED.key == FACE.key and FACE_RETRAINED.sha256 != FACE.sha256
    with pytest.raises(GalleryMismatch) as mismatch:
        store.identify(gallery, [face], FACE_RETRAINED)
    message = str(mismatch.value)
    assert f"sha256 {FACE.sha256[:12]}" in message and f"sha256 {FACE_RETRAINED.sha256[:12]}" in message
    assert "Re-enrol its subjects into a new gallery" in message
    with pytest.raises(GalleryMismatch, match="templates of different models cannot be compared"):
        store.enroll(gallery, "bob", face, FACE_RETRAINED, "src")

    # An embedding of another size never reaches the database.
    with pytest.raises(InvalidInput, match="an embedding of 64 dimensions cannot join a gallery of 128"):
        store.enroll(gallery, "bob", voice, FACE, "src")
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        store.identify(gallery, [np.full(128, np.nan, dtype=np.float32)], FACE)

    # Nothing of the refused enrolments was stored; the gallery still works with its own model.
    assert rows_in(direct, gallery) == 1
    _, (candidates,) = store.identify(gallery, [face], FACE)
    assert [c.subject_id for c in candidates] == ["alice"]
    assert store.forget(gallery, "alice", "vision") == 1


def test_galleries_are_isolated_even_with_identical_vectors(store, names, direct, rng):
    lobby, lab = names("lobby"), names("lab")
    shared = unit_vectors(rng, 3)
    for i, vector in enumerate(shared):
        store.enroll(lobby, f"lobby-{i}", vector, FACE, "src")
        store.enroll(lab, f"lab-{i}", vector, FACE, "src")
    store.enroll(lobby, "both", shared[0], FACE, "src")
    store.enroll(lab, "both", shared[0], FACE, "src")

    for gallery, prefix in ((lobby, "lobby-"), (lab, "lab-")):
        _, results = store.identify(gallery, list(shared), FACE, top_k=100)
        for candidates in results:
            ids = {c.subject_id for c in candidates}
            assert ids == {f"{prefix}{i}" for i in range(3)} | {"both"}

    # Forgetting a subject in one gallery leaves the same subject id in the other alone.
    assert store.forget(lobby, "both", "vision") == 1
    assert rows_in(direct, lobby, "both") == 0
    assert rows_in(direct, lab, "both") == 1
    assert table_of(direct, lobby) != table_of(direct, lab)


def test_forget_deletes_every_template_for_real(store, names, direct, rng):
    gallery = names()
    for i, vector in enumerate(unit_vectors(rng, 5)):
        store.enroll(gallery, "gina", vector, FACE, f"g{i}")
    for i, vector in enumerate(unit_vectors(rng, 2)):
        store.enroll(gallery, "hank", vector, FACE, f"h{i}")
    assert rows_in(direct, gallery, "gina") == 5

    assert store.forget(gallery, "gina", "vision") == 5
    assert rows_in(direct, gallery, "gina") == 0
    assert rows_in(direct, gallery) == 2
    table = pgsql.Identifier(table_of(direct, gallery))
    remaining = direct.execute(pgsql.SQL("SELECT DISTINCT subject_id FROM {}").format(table)).fetchall()
    assert remaining == [("hank",)]
    assert ("gina", "g0") not in store.enrolled_sources(gallery)

    # The gallery stays (empty) once its last subject is forgotten.
    assert store.forget(gallery, "hank", "vision") == 2
    stats = store.stats(gallery)
    assert (stats["subjects"], stats["templates"], stats["first_enrolled"]) == (0, 0, None)
    _, (candidates,) = store.identify(gallery, [unit_vectors(rng, 1)[0]], FACE)
    assert candidates == []


# -- exact and HNSW search ---------------------------------------------------


def _hnsw_scans(direct: psycopg.Connection, gallery_id: int) -> int:
    row = direct.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s",
                         (f"ident_templates_{gallery_id}_hnsw",)).fetchone()
    return -1 if row is None else int(row[0])


def test_search_switches_to_hnsw_past_index_min_templates(make_store, names, direct, rng):
    # 800, not 200: over a table of a few hundred 128-d templates PostgreSQL's planner reads the
    # table (cheaper, and exact) even with the index there; from about 600 on it takes the index.
    mark = 800
    # HNSW alone, as a process searches while its shortlist is built (test_shortlist.py covers that path).
    store = make_store(index_min_templates=mark, shortlists=False)
    gallery = names()
    subjects = mark + 20
    templates = unit_vectors(rng, subjects)
    ids = [f"p{i:04d}" for i in range(subjects)]

    # One short of the mark, by COPY: still searched exactly, no index.
    assert store.bulk_load(gallery, FACE, ((ids[i], "src", templates[i]) for i in range(mark - 1))) == mark - 1
    stats = store.stats(gallery)
    assert (stats["search"], stats["templates"], stats["index_min_templates"]) == ("exact", mark - 1, mark)
    gallery_id = store.gallery(gallery).id
    assert _hnsw_scans(direct, gallery_id) == -1

    # The enrolment that reaches the mark builds the index; searches go through it from then on.
    assert not store.enroll(gallery, ids[mark - 1], templates[mark - 1], FACE, "src").gallery.indexed
    assert store.stats(gallery)["search"] == "hnsw"
    for i in range(mark, subjects):  # enrolments after the build join the index
        assert store.enroll(gallery, ids[i], templates[i], FACE, "src").gallery.indexed
    indexes = direct.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s AND indexdef LIKE "
                             "'%%USING hnsw%%'", (f"ident_templates_{gallery_id}",)).fetchall()
    assert len(indexes) == 1 and "vector_cosine_ops" in indexes[0][1], indexes
    (valid,) = direct.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass",
                              (indexes[0][0],)).fetchone()
    assert valid

    # The planner takes the index for the store's search query ...
    probe = near(templates[5], rng)
    with direct.transaction():
        direct.execute("SET LOCAL hnsw.ef_search = 100")
        plan = "\n".join(row[0] for row in direct.execute(pgsql.SQL(
            "EXPLAIN SELECT subject_id, max(1 - distance) AS score FROM "
            "(SELECT subject_id, embedding <=> %(probe)s AS distance FROM {} "
            " ORDER BY embedding <=> %(probe)s LIMIT %(nearest)s) nearest "
            "GROUP BY subject_id ORDER BY score DESC LIMIT %(k)s").format(pgsql.Identifier(table_of(direct, gallery))),
            {"probe": probe, "nearest": 100, "k": 10}).fetchall())
    assert f"Index Scan using ident_templates_{gallery_id}_hnsw" in plan, plan

    # ... and the store's own searches scanned it (the server's statistics count them).
    before = max(0, _hnsw_scans(direct, gallery_id))
    probes_of = list(range(0, subjects, 20)) + [subjects - 1]
    probes = [near(templates[i], rng) for i in probes_of]
    _, results = store.identify(gallery, probes, FACE, top_k=10)
    # A backend reports its counts when idle, up to 10 s late unless told to now.
    store.database.connection().execute("SELECT pg_stat_force_next_flush()")
    deadline = time.monotonic() + 5
    while _hnsw_scans(direct, gallery_id) < before + len(probes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _hnsw_scans(direct, gallery_id) >= before + len(probes)

    # For genuine probes the index finds what an exact search finds.
    exact = templates.astype(np.float64) @ np.stack(probes).astype(np.float64).T
    for column, (i, candidates) in enumerate(zip(probes_of, results)):
        assert candidates[0].subject_id == ids[int(np.argmax(exact[:, column]))] == ids[i]
        assert candidates[0].score == pytest.approx(float(exact[:, column].max()), abs=1e-5)
        assert len(candidates) == 10 and len({c.subject_id for c in candidates}) == 10
        assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)


def test_an_indexed_gallery_smaller_than_top_k_returns_all_its_subjects(store, names, rng):
    gallery = names()
    vectors = unit_vectors(rng, 9)
    for i, vector in enumerate(vectors):
        store.enroll(gallery, f"q{i // 3}", vector, FACE, f"src{i}")  # three subjects, three templates each
    assert store.build_index(gallery) > 0.0
    assert store.stats(gallery)["search"] == "shortlist"
    assert store.build_index(gallery) == 0.0  # already built

    probe = near(vectors[4], rng)
    # Through HNSW while this process's shortlist is built, then through the shortlist: the same answer.
    _, (through_hnsw,) = store.identify(gallery, [probe], FACE, top_k=10)
    assert len(store.shortlist(gallery)) == 9
    _, (through_shortlist,) = store.identify(gallery, [probe], FACE, top_k=10)
    for candidates in (through_hnsw, through_shortlist):
        assert sorted(c.subject_id for c in candidates) == ["q0", "q1", "q2"]
        assert candidates[0] == Candidate("q1", pytest.approx(cosine(probe, vectors[4]), abs=1e-5))


def test_bulk_load_past_the_mark_builds_the_index(make_store, names, rng):
    store = make_store(index_min_templates=50)
    gallery = names()
    rows = [(f"r{i}", "src", v) for i, v in enumerate(unit_vectors(rng, 60))]
    assert store.bulk_load(gallery, FACE, iter(rows)) == 60
    assert store.stats(gallery)["search"] == "shortlist"
    # Loading the same rows again adds nothing.
    assert store.bulk_load(gallery, FACE, iter(rows)) == 0
    assert store.stats(gallery)["templates"] == 60


# -- what operators read and set ---------------------------------------------


def test_galleries_and_stats_figures(store, names, rng):
    faces, voices = names("faces"), names("voices")
    for i, vector in enumerate(unit_vectors(rng, 7)):
        store.enroll(faces, f"f{i % 3}", vector, FACE, f"src{i}")  # 3 subjects: 3, 2 and 2 templates
    for i, vector in enumerate(unit_vectors(rng, 2, VOICE.dimensions)):
        store.enroll(voices, f"v{i}", vector, VOICE, "src")

    listed = {row["name"]: row for row in store.galleries()}
    assert listed[faces] == {"name": faces, "modality": "vision", "model": FACE.key, "subjects": 3, "templates": 7}
    assert listed[voices] == {"name": voices, "modality": "audio", "model": VOICE.key, "subjects": 2,
                              "templates": 2}
    ordered = [row["name"] for row in store.galleries()]
    assert ordered == sorted(ordered)

    stats = store.stats(faces)
    assert {key: stats[key] for key in ("name", "modality", "model", "model_sha256", "dimensions", "subjects",
                                        "templates", "most_templates_per_subject", "threshold", "search",
                                        "index_min_templates", "ef_search")} == {
        "name": faces, "modality": "vision", "model": FACE.key, "model_sha256": FACE.sha256, "dimensions": 128,
        "subjects": 3, "templates": 7, "most_templates_per_subject": 3, "threshold": None, "search": "exact",
        "index_min_templates": 5_000, "ef_search": 100,
    }
    assert stats["bytes"] > 0
    first, last = datetime.fromisoformat(stats["first_enrolled"]), datetime.fromisoformat(stats["last_enrolled"])
    assert first.tzinfo is not None and first <= last
    assert store.stats(voices)["dimensions"] == VOICE.dimensions


def test_set_threshold(store, names, rng):
    gallery = names()
    store.enroll(gallery, "alice", unit_vectors(rng, 1)[0], FACE, "src")
    assert store.set_threshold(gallery, 0.42).threshold == pytest.approx(0.42)
    assert store.stats(gallery)["threshold"] == pytest.approx(0.42)
    assert store.gallery(gallery).threshold == pytest.approx(0.42)
    for edge in (-1.0, 1.0, 0):
        assert store.set_threshold(gallery, edge).threshold == edge
    assert store.set_threshold(gallery, None).threshold is None  # back to the model's calibrated one

    store.set_threshold(gallery, 0.3)
    for bad in (1.01, -1.5, 7, float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match="a threshold is a cosine similarity from -1 to 1"):
            store.set_threshold(gallery, bad)
    assert store.stats(gallery)["threshold"] == pytest.approx(0.3)  # a refused value changed nothing


def test_bulk_load_and_export_round_trip_exactly(store, names, rng):
    source, copy = names("source"), names("copy")
    vectors = unit_vectors(rng, 40)
    vectors[0] = np.float32([1e-38, -3.4e38, 0.1, 1 / 3] + [0.0] * 124)  # values float32 must carry as they are
    rows = [(f"s{i % 13}", f"src-{i}", vectors[i]) for i in range(40)]
    reported = []
    assert store.bulk_load(source, FACE, iter(rows), progress=reported.append) == 40

    gallery, exported = store.export_rows(source)
    assert (gallery.name, gallery.model, gallery.model_sha256) == (source, FACE.key, FACE.sha256)
    exported = list(exported)
    assert [(s, src) for s, src, _, _ in exported] == [(s, src) for s, src, _ in rows]
    for (_, _, original), (_, _, loaded, enrolled_at) in zip(rows, exported):
        assert loaded.dtype == np.float32
        assert np.array_equal(loaded, original)
        datetime.fromisoformat(enrolled_at)

    # What was exported loads into another gallery bit for bit.
    assert store.bulk_load(copy, FACE, ((s, src, e) for s, src, e, _ in exported)) == 40
    _, again = store.export_rows(copy)
    again = list(again)
    assert len(again) == 40
    for (s1, src1, e1, _), (s2, src2, e2, _) in zip(exported, again):
        assert (s1, src1) == (s2, src2) and e1.tobytes() == e2.tobytes()
    assert store.stats(copy)["subjects"] == 13

    # A bad row refuses the whole load.
    with pytest.raises(InvalidInput, match="an embedding of 3 dimensions"):
        store.bulk_load(copy, FACE, iter([("new", "x", vectors[1]), ("bad", "y", np.ones(3, dtype=np.float32))]))
    with pytest.raises(GalleryMismatch):
        store.bulk_load(copy, FACE_RETRAINED, iter(rows))
    assert store.stats(copy)["templates"] == 40
    # The store still works after the failed COPY.
    _, (candidates,) = store.identify(copy, [vectors[5]], FACE, top_k=1)
    assert candidates[0].subject_id == "s5"


# -- many processes at once --------------------------------------------------
#
# One crowd of spawned processes serves two tests (each spawn costs seconds of imports): four
# workers connect at the same moment to a database nobody has used, so they race to create the
# vector extension and to migrate it, then enrol 50 templates each into one gallery that none
# of them has yet, ten of them the same (subject, source) in all four.

WORKERS, ENROLMENTS, SHARED = 4, 50, 10


def _crowd_member(barrier, results, url, data_dir, gallery, worker):
    try:
        database = Database(url, data_dir)
        barrier.wait(timeout=120)
        database.connection()
        barrier.wait(timeout=60)
        store = GalleryStore(database)
        outcomes = []
        for i in range(ENROLMENTS):
            if i < SHARED:
                subject, source, seed = f"shared-{i}", f"shared-src-{i}", i
            else:
                subject, source, seed = f"w{worker}-s{i % 20}", f"w{worker}-src-{i}", 1000 * (worker + 1) + i
            vector = unit_vectors(np.random.default_rng(seed), 1)[0]
            enrolment = store.enroll(gallery, subject, vector, FACE, source)
            outcomes.append((subject, source, enrolment.added, enrolment.templates, enrolment.gallery.id))
        database.close()
        results.put(("ok", outcomes))
    except BaseException as exc:  # reported to the parent, which fails the test with it
        results.put(("error", f"worker {worker}: {type(exc).__name__}: {exc}"))


def _new_database(direct: psycopg.Connection, server, label: str) -> str:
    dbname = f"fresh_{label}_{time.monotonic_ns()}"
    direct.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(dbname)))
    return url_for_database(server.url, dbname)


@pytest.fixture(scope="module")
def crowd(gallery_server, direct):
    """(database URL, gallery name, every worker's outcomes) once the crowd is done."""
    url = _new_database(direct, gallery_server, "crowd")
    gallery = "crowded"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    results = context.Queue()
    processes = [context.Process(target=_crowd_member,
                                 args=(barrier, results, url, str(gallery_server.data_dir), gallery, worker))
                 for worker in range(WORKERS)]
    for process in processes:
        process.start()
    collected = []
    try:
        for _ in processes:
            collected.append(results.get(timeout=180))
    except queue.Empty:
        pass
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    errors = [message for status, message in collected if status == "error"]
    assert not errors, errors
    assert len(collected) == WORKERS and [p.exitcode for p in processes] == [0] * WORKERS, collected
    yield url, gallery, [row for _, rows in collected for row in rows]


@pytest.mark.slow
def test_concurrent_enrolment_from_several_processes(crowd, gallery_server):
    url, gallery, outcomes = crowd
    store = GalleryStore(Database(url, gallery_server.data_dir))

    assert len(outcomes) == WORKERS * ENROLMENTS
    assert len({gallery_id for *_, gallery_id in outcomes}) == 1  # all four joined one gallery
    added = [(subject, source) for subject, source, was_added, _, _ in outcomes if was_added]
    assert len(added) == len(set(added)) == SHARED + WORKERS * (ENROLMENTS - SHARED)
    for i in range(SHARED):  # each shared pair was added by exactly one process; the others saw it there
        mine = [row for row in outcomes if row[0] == f"shared-{i}"]
        assert len(mine) == WORKERS and sum(row[2] for row in mine) == 1 and {row[3] for row in mine} == {1}

    assert [row["name"] for row in store.galleries()] == [gallery]
    with psycopg.connect(url, autocommit=True) as conn:
        assert rows_in(conn, gallery) == 170
        for i in range(SHARED):
            assert rows_in(conn, gallery, f"shared-{i}") == 1
        (models,) = conn.execute("SELECT count(*) FROM ident_models").fetchone()
        assert models == 1
    stats = store.stats(gallery)
    assert (stats["subjects"], stats["templates"]) == (SHARED + WORKERS * 20, 170)
    assert store.enrolled_sources(gallery) == {(subject, source) for subject, source, *_ in outcomes}
    store.database.close()


@pytest.mark.slow
def test_migrations_apply_once_when_many_processes_connect_at_once(crowd, gallery_server):
    url, _, _ = crowd
    with psycopg.connect(url, autocommit=True) as conn:
        versions = conn.execute("SELECT version, description FROM ident_schema_migrations ORDER BY version").fetchall()
        assert versions == [(version, description) for version, description, _ in migrations.MIGRATIONS]
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'").fetchone() == (1,)

        # Connecting again applies nothing more.
        Database(url, gallery_server.data_dir).connection().close()
        assert conn.execute("SELECT count(*) FROM ident_schema_migrations").fetchone() == (len(migrations.MIGRATIONS),)


def test_a_database_of_a_newer_schema_is_refused(gallery_server, direct):
    url = _new_database(direct, gallery_server, "newer")
    Database(url, gallery_server.data_dir).connection().close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO ident_schema_migrations (version, description) VALUES (%s, 'from the future')",
                     (migrations.LATEST + 1,))

    newer = Database(url, gallery_server.data_dir)
    with pytest.raises(ConfigurationError, match=f"schema version {migrations.LATEST + 1}, newer than this "
                                                 f"release knows \\({migrations.LATEST}\\)"):
        newer.connection()
    assert not newer.connected
    with pytest.raises(ConfigurationError, match="run the release that migrated it"):
        GalleryStore(newer).galleries()
    with psycopg.connect(url, autocommit=True) as conn:  # and it was not written to
        assert conn.execute("SELECT count(*) FROM ident_galleries").fetchone() == (0,)
