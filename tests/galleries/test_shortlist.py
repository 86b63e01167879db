"""Shortlists: faiss's compressed copy of a gallery names the rows, a real PostgreSQL scores them.

The first tests are numpy and faiss alone; the rest run the store on the
session's embedded server (conftest.py).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest

from galleries import shortlist as shortlist_module
from galleries.shortlist import EXTEND_AFTER_ROWS, REBUILD_AFTER_GONE, SHORTLIST_ROWS, Shortlist, ShortlistCache
from galleries.store import INSERT_LOCK_CLASS
from .conftest import FACE, VOICE, near, table_of, unit_vectors

def identities(rng: np.random.Generator, subjects: int, per_subject: int, dimensions: int = 128,
               genuine: float = 0.62) -> tuple[np.ndarray, np.ndarray, float]:
    """Templates around random subject vectors at the face model's genuine cosine (as ident bench makes them)."""
    sigma = np.sqrt((1 / genuine - 1) / dimensions)
    centres = unit_vectors(rng, subjects, dimensions)
    templates = np.repeat(centres, per_subject, axis=0) + sigma * rng.standard_normal(
        (subjects * per_subject, dimensions)).astype(np.float32)
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    return centres, templates.astype(np.float32), sigma


def draw(centre: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    probe = centre + sigma * rng.standard_normal(centre.shape[0]).astype(np.float32)
    return (probe / np.linalg.norm(probe)).astype(np.float32)


# -- the copy alone -------------------------------------------------------------


def test_the_exact_nearest_template_is_among_those_named(rng):
    centres, templates, sigma = identities(rng, 10_000, 2)
    shortlist = Shortlist(1, 128, templates[rng.choice(len(templates), 4096, replace=False)])
    row_ids = np.arange(1, len(templates) + 1) * 3  # ids as a table has them: ascending, with gaps
    shortlist.add(row_ids, templates)
    assert len(shortlist) == len(templates) and shortlist.last_id == row_ids[-1]
    assert shortlist.nbytes == len(templates) * (128 // 4 + 8), "32 bytes of codes and an 8-byte id per template"
    strangers = unit_vectors(rng, 20)
    probes = [draw(centres[i], sigma, rng) for i in rng.integers(0, len(centres), 80)]
    probes += [draw(s, sigma, rng) for s in strangers]
    for probe in probes:
        named = shortlist.nearest(probe, SHORTLIST_ROWS)
        assert len(named) == SHORTLIST_ROWS and len(set(named.tolist())) == SHORTLIST_ROWS
        assert row_ids[int(np.argmax(templates @ probe))] in named


def test_rows_go_in_ascending_id_order_after_the_last(rng):
    vectors = unit_vectors(rng, 10)
    shortlist = Shortlist(1, 128, vectors)
    shortlist.add(np.array([5, 7]), vectors[:2])
    with pytest.raises(ValueError, match="ascending id order"):
        shortlist.add(np.array([7, 9]), vectors[2:4])  # 7 is already in
    with pytest.raises(ValueError, match="ascending id order"):
        shortlist.add(np.array([12, 10]), vectors[2:4])
    assert (len(shortlist), shortlist.last_id) == (2, 7)


def test_rows_known_gone_are_left_out_and_the_copy_wears_out(rng):
    vectors = unit_vectors(rng, 2_000)
    shortlist = Shortlist(1, 128, vectors)
    shortlist.add(np.arange(1, 2_001), vectors)
    probe = near(vectors[10], rng)
    first = shortlist.nearest(probe, 20)
    assert first[0] == 11
    shortlist.mark_gone([11])
    after = shortlist.nearest(probe, 20)
    assert 11 not in after and len(after) == 20
    assert not shortlist.worn
    shortlist.mark_gone(range(100, 100 + REBUILD_AFTER_GONE))
    assert shortlist.worn


@pytest.mark.parametrize("dimensions", [63, 192])
def test_odd_and_speaker_sized_dimensions(rng, dimensions):
    vectors = unit_vectors(rng, 700, dimensions)
    shortlist = Shortlist(1, dimensions, vectors)
    shortlist.add(np.arange(1, 701), vectors)
    assert shortlist.nearest(near(vectors[3], rng), 5)[0] == 4


def test_a_small_gallery_is_named_whole(rng):
    vectors = unit_vectors(rng, 9)
    shortlist = Shortlist(1, 128, vectors)  # fewer templates than centroids: repeated up to faiss's minimum
    shortlist.add(np.arange(1, 10), vectors)
    assert sorted(shortlist.nearest(vectors[0], SHORTLIST_ROWS).tolist()) == list(range(1, 10))


class _Gallery:
    def __init__(self, gallery_id: int, name: str) -> None:
        self.id, self.name = gallery_id, name


def test_a_build_that_fails_is_reported_and_tried_again(rng, monkeypatch, caplog):
    vectors = unit_vectors(rng, 50)
    attempts = []

    def build(gallery):
        attempts.append(gallery.id)
        if len(attempts) == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        built = Shortlist(gallery.id, 128, vectors)
        built.add(np.arange(1, 51), vectors)
        return built

    cache = ShortlistCache(build)
    gallery = _Gallery(7, "front-door")
    with pytest.raises(RuntimeError, match="could not be built: OperationalError: server closed"):
        cache.wait(gallery, 30)
    assert "front-door" in caplog.text and "searching through HNSW" in caplog.text
    status = cache.status()["front-door"]
    assert (status["state"], status["templates"]) == ("failed", 0) and "server closed" in status["problem"]
    assert cache.ready(gallery) is None and len(attempts) == 1, "not tried again before RETRY_AFTER_S"

    monkeypatch.setattr(shortlist_module, "RETRY_AFTER_S", 0.0)
    assert len(cache.wait(gallery, 30)) == 50
    assert cache.ready(gallery) is not None and len(attempts) == 2
    status = cache.status()["front-door"]
    assert (status["state"], status["templates"], status["problem"]) == ("ready", 50, None)
    assert status["bytes"] == 50 * 40 and status["built_s"] >= 0


# -- through the store, on PostgreSQL ------------------------------------------------


def _indexed_gallery(make_store, names, rng, subjects: int = 3_000):
    store = make_store(index_min_templates=1_000)
    gallery = names()
    centres, templates, sigma = identities(rng, subjects, 2)
    rows = [(f"s{i // 2:05d}", f"src{i}", templates[i]) for i in range(len(templates))]
    assert store.bulk_load(gallery, FACE, iter(rows)) == len(rows)
    assert store.gallery(gallery).indexed
    return store, gallery, centres, templates, sigma


def test_an_indexed_gallery_is_searched_through_its_shortlist_as_exactly_as_a_scan(make_store, names, rng, direct):
    store, gallery, centres, templates, sigma = _indexed_gallery(make_store, names, rng)
    shortlist = store.shortlist(gallery)
    (last_id,) = direct.execute(f"SELECT max(id) FROM {table_of(direct, gallery)}").fetchone()
    assert (len(shortlist), shortlist.last_id) == (len(templates), last_id)
    assert store.stats(gallery)["search"] == "shortlist"
    probes = [draw(centres[i], sigma, rng) for i in rng.integers(0, len(centres), 40)]
    probes += [draw(s, sigma, rng) for s in unit_vectors(rng, 10)]
    _, results = store.identify(gallery, probes, FACE, top_k=5)
    scores = np.stack(probes).astype(np.float64) @ templates.astype(np.float64).T
    for column, candidates in enumerate(results):
        per_subject = scores[column].reshape(-1, 2).max(axis=1)  # two templates a subject, consecutive
        best = np.argsort(-per_subject)[:5]
        assert [c.subject_id for c in candidates] == [f"s{i:05d}" for i in best]
        assert [c.score for c in candidates] == pytest.approx(per_subject[best].tolist(), abs=1e-5)


def test_new_rows_count_at_once_and_forgotten_ones_drop_out(make_store, names, rng):
    store, gallery, centres, templates, sigma = _indexed_gallery(make_store, names, rng, subjects=1_000)
    shortlist = store.shortlist(gallery)
    held = len(shortlist)

    # Enrolled after the copy was made: found by the very next search, scored exactly.
    newcomer = unit_vectors(rng, 1)[0]
    store.enroll(gallery, "newcomer", newcomer, FACE, "src-new")
    _, [[top, *_]] = store.identify(gallery, [near(newcomer, rng)], FACE)
    assert top.subject_id == "newcomer" and len(shortlist) == held

    # Forgotten after the copy was made: gone from the answers, and remembered as gone.
    probe = draw(centres[7], sigma, rng)
    _, [[top, *_]] = store.identify(gallery, [probe], FACE)
    assert top.subject_id == "s00007"
    assert store.forget(gallery, "s00007", "vision") == 2
    _, [candidates] = store.identify(gallery, [probe], FACE)
    assert "s00007" not in [c.subject_id for c in candidates] and len(candidates) == 5
    assert len(shortlist.gone) == 2

    # Past EXTEND_AFTER_ROWS newer rows, a search adds them to the copy.
    _, more, _ = identities(rng, EXTEND_AFTER_ROWS, 1)
    store.bulk_load(gallery, FACE, ((f"late{i}", "src", v) for i, v in enumerate(more)))
    _, [[top, *_]] = store.identify(gallery, [near(more[3], rng)], FACE)
    assert top.subject_id == "late3"
    assert len(shortlist) == held + 1 + EXTEND_AFTER_ROWS
    assert store.shortlists.status()[gallery]["templates"] == len(shortlist)


def test_a_worn_shortlist_is_rebuilt_while_it_still_answers(make_store, names, rng, monkeypatch):
    store, gallery, centres, templates, sigma = _indexed_gallery(make_store, names, rng, subjects=1_000)
    worn = store.shortlist(gallery)
    worn.mark_gone(range(-REBUILD_AFTER_GONE, 0))  # ids no row has: as if forgotten
    _, [[top, *_]] = store.identify(gallery, [draw(centres[3], sigma, rng)], FACE)
    assert top.subject_id == "s00003", "the worn copy answers while its successor is built"
    deadline = time.monotonic() + 60
    while store.shortlists.ready(store.gallery(gallery)) is worn and time.monotonic() < deadline:
        time.sleep(0.05)
    rebuilt = store.shortlists.ready(store.gallery(gallery))
    assert rebuilt is not worn and not rebuilt.gone and len(rebuilt) == len(templates)


def test_a_voice_gallery_is_shortlisted_too(make_store, names, rng):
    store = make_store(index_min_templates=600)
    gallery = names()
    voices = unit_vectors(rng, 700, VOICE.dimensions)
    store.bulk_load(gallery, VOICE, ((f"v{i}", "src", v) for i, v in enumerate(voices)))
    assert len(store.shortlist(gallery)) == 700
    _, [[top, *_]] = store.identify(gallery, [near(voices[42], rng)], VOICE)
    assert top.subject_id == "v42"


def test_shortlists_off_searches_through_hnsw(make_store, names, rng):
    store = make_store(index_min_templates=600, shortlists=False)
    gallery = names()
    vectors = unit_vectors(rng, 700)
    store.bulk_load(gallery, FACE, ((f"p{i}", "src", v) for i, v in enumerate(vectors)))
    assert store.stats(gallery)["search"] == "hnsw"
    with pytest.raises(Exception, match="shortlists are off here"):
        store.shortlist(gallery)
    _, [[top, *_]] = store.identify(gallery, [near(vectors[9], rng)], FACE)
    assert top.subject_id == "p9"


def test_template_ids_are_drawn_in_commit_order(store, names, rng, gallery_server):
    """An insert waits for the gallery's earlier insert to end, so a shortlist never skips a late commit."""
    gallery = names()
    first, second = unit_vectors(rng, 2)
    store.enroll(gallery, "a", first, FACE, "src-a")
    found = store.gallery(gallery)
    table = table_of(store.database.connection(), gallery)
    with psycopg.connect(gallery_server.url, autocommit=True) as other:
        with other.transaction():
            other.execute("SELECT pg_advisory_xact_lock(%s, %s)", (INSERT_LOCK_CLASS, found.id))
            (early_id,) = other.execute(
                f"INSERT INTO {table} (subject_id, source, embedding, model_id) "
                f"SELECT 'early', 'src', embedding, model_id FROM {table} LIMIT 1 RETURNING id").fetchone()
            done = threading.Event()
            enrolling = threading.Thread(target=lambda: (store.enroll(gallery, "b", second, FACE, "src-b"),
                                                         done.set()))
            enrolling.start()
            assert not done.wait(1.0), "the second insert waits for the first transaction to end"
        enrolling.join(30)
    assert done.is_set()
    (late_id,) = store.database.connection().execute(f"SELECT id FROM {table} WHERE subject_id = 'b'").fetchone()
    assert late_id > early_id
