"""Galleries and their templates: enrol, identify, forget, and what an operator asks about them.

Each gallery has its own table, ``ident_templates_<id>``, with a column of
its model's dimensions. While the gallery is small a search reads every
template (exact, and a few milliseconds); once it holds
IDENT_GALLERY_INDEX_MIN_TEMPLATES templates the process that crosses the mark
builds the table's HNSW cosine index. An indexed gallery is searched through
the process's shortlist of it (galleries/shortlist.py: every template,
compressed, names the few hundred nearest, which PostgreSQL scores exactly),
and through HNSW, with ``hnsw.ef_search`` = IDENT_GALLERY_EF_SEARCH, while
that shortlist is being built or where IDENT_GALLERY_SHORTLIST=0. A table per
gallery means the index holds only that gallery's templates: pgvector applies
a WHERE clause after the index scan, so a shared index would hand small
galleries fewer rows than asked for.

Template ids grow in commit order: every insert first takes the gallery's
INSERT_LOCK_CLASS transaction lock, so an id is drawn only once every
earlier insert into that gallery has committed or rolled back. A shortlist
therefore lacks exactly the rows above the last id it read.

A subject's score is its best template's cosine similarity to the probe.
Enrolment is idempotent per (subject, source): the source is the payload's
sha256, so a job delivered twice, or the same photo sent again, adds one
template. Nothing here logs an embedding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import psycopg
from psycopg import sql

from tasks.errors import GalleryMismatch, GalleryNotFound, InvalidInput

from .database import Database
from .names import checked_name
from .shortlist import EXTEND_AFTER_ROWS, SHORTLIST_ROWS, TRAINING_SAMPLE, Shortlist, ShortlistCache

log = logging.getLogger(__name__)

MODALITIES = ("vision", "audio")
# HNSW build parameters: pgvector's defaults, which the benchmark's recall was measured with.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
# pg_try_advisory_lock(INDEX_LOCK_CLASS, gallery id): one process builds a gallery's index.
INDEX_LOCK_CLASS = 0x6964
# pg_advisory_xact_lock(INSERT_LOCK_CLASS, gallery id): inserts into a gallery one transaction at a time.
INSERT_LOCK_CLASS = 0x6965
# Rows per fetch when a shortlist reads a gallery's templates.
SHORTLIST_READ_ROWS = 50_000
MAX_TOP_K = 100
# Indexed searches read at least this many nearest templates per candidate asked for.
NEAREST_PER_CANDIDATE = 4


@dataclass(frozen=True)
class EmbeddingModel:
    """The model that made a template: its catalog key, its file's sha256 and its output size."""

    key: str
    sha256: str
    dimensions: int
    modality: str


@dataclass(frozen=True)
class Gallery:
    id: int
    name: str
    modality: str
    model: str
    model_sha256: str
    dimensions: int
    threshold: float | None
    indexed: bool
    # The planner's estimate of its templates (-1: never analysed), read with the row to spare
    # identify a round trip.
    estimated_templates: float = -1.0
    # The templates it holds, where a caller asked (identify does: the threshold depends on it).
    templates: int | None = None

    @property
    def table_name(self) -> str:
        """The gallery's own table, as text (for ``%s::regclass``)."""
        return table_name(self.id)

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.table_name)

    @property
    def index_name(self) -> sql.Identifier:
        return sql.Identifier(f"{self.table_name}_hnsw")


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    score: float


@dataclass(frozen=True)
class Enrolment:
    gallery: Gallery
    templates: int  # the subject's, after this enrolment
    added: bool  # False when this source was already enrolled for the subject


_GALLERY_QUERY = """
    SELECT g.id, g.name, g.modality, m.key, m.sha256, m.dimensions, g.threshold, g.indexed_at IS NOT NULL,
           coalesce(c.reltuples, -1)
    FROM ident_galleries g JOIN ident_models m ON m.id = g.model_id
    LEFT JOIN pg_class c ON c.oid = to_regclass('ident_templates_' || g.id)
"""


class GalleryStore:
    """Every gallery in one database."""

    def __init__(self, database: Database, index_min_templates: int = 5_000, ef_search: int = 100,
                 shortlists: bool = True) -> None:
        self.database = database
        self.index_min_templates = index_min_templates
        self.ef_search = ef_search
        # Indexed galleries' shortlists, built when first searched; None: HNSW only.
        self.shortlists = ShortlistCache(self._build_shortlist) if shortlists else None

    # -- jobs -------------------------------------------------------------

    def enroll(self, name: str, subject_id: str, embedding: np.ndarray, model: EmbeddingModel,
               source: str) -> Enrolment:
        """Add one template to ``subject_id`` in gallery ``name``, creating the gallery on first use."""
        checked_name(name, "gallery name")
        checked_name(subject_id, "subject_id")
        vector = _vector(embedding, model.dimensions)

        def enroll_in(conn: psycopg.Connection) -> Enrolment:
            gallery = self._gallery_for(conn, name, model)
            with conn.transaction():
                _lock_inserts(conn, gallery)
                added = conn.execute(
                    sql.SQL("INSERT INTO {} (subject_id, source, embedding, model_id) "
                            "SELECT %s, %s, %s, id FROM ident_models WHERE key = %s AND sha256 = %s "
                            "ON CONFLICT (subject_id, source) DO NOTHING RETURNING id").format(gallery.table),
                    (subject_id, source, vector, model.key, model.sha256),
                ).fetchone()
                (templates,) = conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE subject_id = %s").format(gallery.table), (subject_id,)
                ).fetchone()
            if added is not None and not gallery.indexed and added[0] >= self.index_min_templates:
                self._index_when_due(conn, gallery)
            return Enrolment(gallery, int(templates), added is not None)

        return self.database.run(enroll_in)

    def identify(self, name: str, embeddings: Sequence[np.ndarray], model: EmbeddingModel,
                 top_k: int = 5) -> tuple[Gallery, list[list[Candidate]]]:
        """The ``top_k`` best subjects for each probe embedding, best first."""
        checked_name(name, "gallery name")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInput(f"option 'top_k' must be a whole number from 1 to {MAX_TOP_K}, got {top_k!r}")
        vectors = [_vector(e, model.dimensions) for e in embeddings]

        def search(conn: psycopg.Connection) -> tuple[Gallery, list[list[Candidate]]]:
            gallery = self._existing(conn, name)
            _check_model(gallery, model)
            ranked = [self._search(conn, gallery, vector, top_k) for vector in vectors]
            return replace(gallery, templates=self._template_count(conn, gallery)), ranked

        return self.database.run(search)

    def forget(self, name: str, subject_id: str, modality: str) -> int:
        """Delete every template of ``subject_id``; the number deleted (0 if it had none)."""
        checked_name(name, "gallery name")
        checked_name(subject_id, "subject_id")

        def delete(conn: psycopg.Connection) -> int:
            gallery = self._existing(conn, name)
            if gallery.modality != modality:
                raise GalleryMismatch(f"gallery {name!r} holds {gallery.modality} templates: forget its subjects "
                                      f"with {gallery.modality}.forget")
            cursor = conn.execute(sql.SQL("DELETE FROM {} WHERE subject_id = %s").format(gallery.table),
                                  (subject_id,))
            return cursor.rowcount

        return self.database.run(delete)

    # -- operators --------------------------------------------------------

    def galleries(self) -> list[dict]:
        """One row per gallery: name, modality, model, subjects, templates."""

        def rows(conn: psycopg.Connection) -> list[dict]:
            found = []
            for gallery in self._all(conn):
                subjects, templates = conn.execute(
                    sql.SQL("SELECT count(DISTINCT subject_id), count(*) FROM {}").format(gallery.table)
                ).fetchone()
                found.append({"name": gallery.name, "modality": gallery.modality, "model": gallery.model,
                              "subjects": int(subjects), "templates": int(templates)})
            return found

        return self.database.run(rows)

    def stats(self, name: str) -> dict:
        checked_name(name, "gallery name")

        def read(conn: psycopg.Connection) -> dict:
            gallery = self._existing(conn, name)
            subjects, templates, most, first, last = conn.execute(
                sql.SQL("SELECT count(*), coalesce(sum(n), 0), coalesce(max(n), 0), min(f), max(l) FROM "
                        "(SELECT subject_id, count(*) AS n, min(enrolled_at) AS f, max(enrolled_at) AS l "
                        "FROM {} GROUP BY subject_id) per_subject").format(gallery.table)
            ).fetchone()
            (size,) = conn.execute("SELECT pg_total_relation_size(%s::regclass)",
                                   (gallery.table_name,)).fetchone()
            return {
                "name": gallery.name, "modality": gallery.modality, "model": gallery.model,
                "model_sha256": gallery.model_sha256, "dimensions": gallery.dimensions,
                "subjects": int(subjects), "templates": int(templates),
                "most_templates_per_subject": int(most),
                "threshold": gallery.threshold,
                "search": ("shortlist" if self.shortlists is not None else "hnsw") if gallery.indexed else "exact",
                "index_min_templates": self.index_min_templates, "ef_search": self.ef_search,
                "bytes": int(size),
                "first_enrolled": first.isoformat() if first else None,
                "last_enrolled": last.isoformat() if last else None,
            }

        return self.database.run(read)

    def set_threshold(self, name: str, threshold: float | None) -> Gallery:
        """Set (or with None, clear) the gallery's own open-set threshold."""
        checked_name(name, "gallery name")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise InvalidInput(f"a threshold is a cosine similarity from -1 to 1, got {threshold}")

        def update(conn: psycopg.Connection) -> Gallery:
            self._existing(conn, name)
            conn.execute("UPDATE ident_galleries SET threshold = %s WHERE name = %s", (threshold, name))
            return self._existing(conn, name)

        return self.database.run(update)

    def gallery(self, name: str) -> Gallery:
        checked_name(name, "gallery name")
        return self.database.run(lambda conn: self._existing(conn, name))

    def enrolled_sources(self, name: str) -> set[tuple[str, str]]:
        """(subject_id, source) of every template, so a batch enrolment can skip what is done."""
        checked_name(name, "gallery name")

        def read(conn: psycopg.Connection) -> set[tuple[str, str]]:
            gallery = self._find(conn, name)
            if gallery is None:
                return set()
            return set(conn.execute(sql.SQL("SELECT subject_id, source FROM {}").format(gallery.table)).fetchall())

        return self.database.run(read)

    def bulk_load(self, name: str, model: EmbeddingModel, rows: Iterable[tuple],
                  progress: Callable[[int], None] | None = None, index_when_due: bool = True) -> int:
        """COPY templates in; rows already there are skipped. Returns rows added.

        Each row is (subject_id, source, embedding) or (subject_id, source,
        embedding, enrolled_at: datetime | None); without a time, now. For
        imports and the benchmark; not retried on a broken connection (the
        rows are an iterator), so a failure says how far it got. A caller
        loading in chunks passes ``index_when_due=False`` and calls
        :meth:`index_if_due` once at the end: an index built after the first
        chunk would take the rest one insertion at a time, many times slower.
        """
        checked_name(name, "gallery name")
        conn = self.database.run(lambda c: c)
        gallery = self._gallery_for(conn, name, model)
        (model_id,) = conn.execute("SELECT id FROM ident_models WHERE key = %s AND sha256 = %s",
                                   (model.key, model.sha256)).fetchone()
        with conn.transaction():
            conn.execute("CREATE TEMPORARY TABLE ident_import (subject_id text, source text, embedding vector, "
                         "enrolled_at timestamptz) ON COMMIT DROP")
            with conn.cursor().copy("COPY ident_import FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["text", "text", "vector", "timestamptz"])
                for count, (subject_id, source, embedding, *when) in enumerate(rows, 1):
                    checked_name(subject_id, "subject_id")
                    copy.write_row((subject_id, source, _vector(embedding, model.dimensions),
                                    when[0] if when else None))
                    if progress is not None and count % 1000 == 0:
                        progress(1000)
            _lock_inserts(conn, gallery)
            added = conn.execute(
                sql.SQL("INSERT INTO {} (subject_id, source, embedding, model_id, enrolled_at) "
                        "SELECT subject_id, source, embedding, %s, coalesce(enrolled_at, now()) FROM ident_import "
                        "ON CONFLICT (subject_id, source) DO NOTHING").format(gallery.table), (model_id,)
            ).rowcount
        if index_when_due and not gallery.indexed:
            self._index_when_due(conn, gallery)
        return added

    def index_if_due(self, name: str) -> bool:
        """Build the gallery's HNSW index if it has reached IDENT_GALLERY_INDEX_MIN_TEMPLATES; whether it has one now."""
        gallery = self.gallery(name)
        if not gallery.indexed:
            self.database.run(lambda conn: self._index_when_due(conn, gallery))
        return self.gallery(name).indexed

    def export_rows(self, name: str) -> tuple[Gallery, Iterator[tuple[str, str, np.ndarray, str]]]:
        """The gallery and an iterator of its templates (subject_id, source, embedding, enrolled_at ISO)."""
        checked_name(name, "gallery name")
        conn = self.database.run(lambda c: c)
        gallery = self._existing(conn, name)

        def rows() -> Iterator[tuple[str, str, np.ndarray, str]]:
            # Binary, so each embedding comes back as the float32 bits it went in as.
            with conn.transaction(), conn.cursor(name="ident_export", binary=True) as cursor:
                cursor.execute(sql.SQL("SELECT subject_id, source, embedding, enrolled_at FROM {} "
                                       "ORDER BY id").format(gallery.table))
                for subject_id, source, embedding, enrolled_at in cursor:
                    yield subject_id, source, _loaded(embedding), enrolled_at.isoformat()

        return gallery, rows()

    def shortlist(self, name: str, timeout_s: float = 600.0) -> Shortlist:
        """The indexed gallery's shortlist in this process, built now if need be (for the benchmark and tests)."""
        gallery = self.gallery(name)
        if self.shortlists is None or not gallery.indexed:
            raise InvalidInput(f"gallery {name!r} is searched without a shortlist: "
                               + ("shortlists are off here" if self.shortlists is None else "it has no index yet"))
        return self.shortlists.wait(gallery, timeout_s)

    def build_index(self, name: str) -> float:
        """Build the gallery's HNSW index now, whatever its size; the seconds it took (0.0 if it had one)."""
        gallery = self.gallery(name)
        if gallery.indexed:
            return 0.0
        started = time.perf_counter()
        conn = self.database.run(lambda c: c)
        self._build_index(conn, gallery)
        return time.perf_counter() - started

    # -- inside -----------------------------------------------------------

    def _search(self, conn: psycopg.Connection, gallery: Gallery, vector: np.ndarray,
                top_k: int) -> list[Candidate]:
        shortlist = self.shortlists.ready(gallery) if self.shortlists is not None and gallery.indexed else None
        if shortlist is not None:
            return self._search_shortlisted(conn, gallery, shortlist, vector, top_k)
        if gallery.indexed:
            # The index yields at most ef_search templates, which are ranked by
            # subject (each by its best). Subjects with several templates each
            # fill that list faster, so a large top_k widens it.
            nearest = max(self.ef_search, NEAREST_PER_CANDIDATE * top_k)
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(nearest)))
                rows = conn.execute(
                    sql.SQL("SELECT subject_id, max(1 - distance) AS score FROM "
                            "(SELECT subject_id, embedding <=> %(probe)s AS distance FROM {} "
                            " ORDER BY embedding <=> %(probe)s LIMIT %(nearest)s) nearest "
                            "GROUP BY subject_id ORDER BY score DESC LIMIT %(k)s").format(gallery.table),
                    {"probe": vector, "nearest": nearest, "k": top_k},
                ).fetchall()
        else:
            rows = conn.execute(
                sql.SQL("SELECT subject_id, max(1 - (embedding <=> %(probe)s)) AS score FROM {} "
                        "GROUP BY subject_id ORDER BY score DESC LIMIT %(k)s").format(gallery.table),
                {"probe": vector, "k": top_k},
            ).fetchall()
        return [Candidate(subject_id, float(score)) for subject_id, score in rows]

    def _search_shortlisted(self, conn: psycopg.Connection, gallery: Gallery, shortlist: Shortlist,
                            vector: np.ndarray, top_k: int) -> list[Candidate]:
        """The shortlist's nearest rows and every row newer than it, scored exactly; best template per subject."""
        named = shortlist.nearest(vector, max(SHORTLIST_ROWS, NEAREST_PER_CANDIDATE * top_k))
        last_id = shortlist.last_id
        rows = conn.execute(
            sql.SQL("SELECT id, subject_id, 1 - (embedding <=> %(probe)s) FROM {} "
                    "WHERE id = ANY(%(named)s::bigint[]) OR id > %(last)s").format(gallery.table),
            # One array literal: psycopg's list dumper costs ~3 us per element, a third of a millisecond here.
            {"probe": vector, "named": "{" + ",".join(map(str, named.tolist())) + "}", "last": last_id},
        ).fetchall()
        best: dict[str, float] = {}
        seen, newer = set(), 0
        for row_id, subject_id, score in rows:
            if row_id > last_id:
                newer += 1
            else:
                seen.add(row_id)
            if score > best.get(subject_id, -2.0):
                best[subject_id] = float(score)
        if len(seen) < len(named):
            shortlist.mark_gone(set(named.tolist()) - seen)  # forgotten since the shortlist read them
        if newer >= EXTEND_AFTER_ROWS:
            self._extend_shortlist(conn, gallery, shortlist)
        ranked = sorted(best.items(), key=lambda item: -item[1])[:top_k]
        return [Candidate(subject_id, score) for subject_id, score in ranked]

    def _build_shortlist(self, gallery: Gallery) -> Shortlist:
        """A shortlist of every template of ``gallery``, read on a connection of its own (a background thread's)."""
        reader = Database(self.database.url, self.database.data_dir)
        try:
            def read(conn: psycopg.Connection) -> Shortlist:
                with conn.cursor(binary=True) as cursor:
                    cursor.execute(sql.SQL("SELECT embedding FROM {} ORDER BY random() LIMIT %s").format(gallery.table),
                                   (TRAINING_SAMPLE,))
                    sample = np.stack([_loaded(embedding) for (embedding,) in cursor])
                shortlist = Shortlist(gallery.id, gallery.dimensions, sample)
                self._extend_shortlist(conn, gallery, shortlist)
                return shortlist

            return reader.run(read)
        finally:
            reader.close()

    def _extend_shortlist(self, conn: psycopg.Connection, gallery: Gallery, shortlist: Shortlist) -> None:
        """Add every row above the shortlist's last id, in id order."""
        with conn.transaction(), conn.cursor(name=f"ident_shortlist_{gallery.id}", binary=True) as cursor:
            cursor.execute(sql.SQL("SELECT id, embedding FROM {} WHERE id > %s ORDER BY id").format(gallery.table),
                           (shortlist.last_id,))
            while rows := cursor.fetchmany(SHORTLIST_READ_ROWS):
                shortlist.add(np.fromiter((row_id for row_id, _ in rows), dtype=np.int64, count=len(rows)),
                              np.stack([_loaded(embedding) for _, embedding in rows]))

    def _template_count(self, conn: psycopg.Connection, gallery: Gallery) -> int:
        """How many templates the gallery holds: counted while it is small, the planner's estimate once indexed.

        Counting a million rows takes tens of milliseconds, longer than the
        search; the estimate (refreshed by autovacuum's ANALYZE) is close
        enough for a threshold that moves with the logarithm of the size.
        """
        if gallery.indexed and gallery.estimated_templates >= 0:
            return int(gallery.estimated_templates)
        (count,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(gallery.table)).fetchone()
        return int(count)

    def _gallery_for(self, conn: psycopg.Connection, name: str, model: EmbeddingModel) -> Gallery:
        """The gallery ``name``, created for ``model`` if it does not exist; GalleryMismatch if it is another's."""
        gallery = self._find(conn, name)
        if gallery is None:
            with conn.transaction():
                conn.execute("INSERT INTO ident_models (key, sha256, dimensions) VALUES (%s, %s, %s) "
                             "ON CONFLICT (key, sha256) DO NOTHING", (model.key, model.sha256, model.dimensions))
                created = conn.execute(
                    "INSERT INTO ident_galleries (name, modality, model_id) "
                    "SELECT %s, %s, id FROM ident_models WHERE key = %s AND sha256 = %s "
                    "ON CONFLICT (name) DO NOTHING RETURNING id",
                    (name, model.modality, model.key, model.sha256),
                ).fetchone()
                if created is not None:
                    table = sql.Identifier(table_name(created[0]))
                    conn.execute(sql.SQL(
                        "CREATE TABLE {} (id bigserial PRIMARY KEY, subject_id text NOT NULL, source text NOT NULL, "
                        "embedding vector({}) NOT NULL, model_id smallint NOT NULL REFERENCES ident_models (id), "
                        "enrolled_at timestamptz NOT NULL DEFAULT now(), UNIQUE (subject_id, source))"
                    ).format(table, sql.Literal(model.dimensions)))
                    log.info("gallery %r created (%s, %s, %d dimensions)", name, model.modality, model.key,
                             model.dimensions)
            gallery = self._find(conn, name)
        _check_model(gallery, model)
        return gallery

    def _index_when_due(self, conn: psycopg.Connection, gallery: Gallery) -> None:
        (templates,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(gallery.table)).fetchone()
        if templates >= self.index_min_templates:
            self._build_index(conn, gallery, templates)

    def _build_index(self, conn: psycopg.Connection, gallery: Gallery, templates: int | None = None) -> None:
        (locked,) = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (INDEX_LOCK_CLASS, gallery.id)).fetchone()
        if not locked:
            return  # another process is building it; searches stay exact until it is done
        try:
            current = self._find(conn, gallery.name)
            if current is None or current.indexed:
                return
            if templates is None:
                (templates,) = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(gallery.table)).fetchone()
            # The graph must fit in maintenance_work_mem or the build slows down many
            # times over: pgvector 0.6 holds the vector and 16 bytes per neighbour slot
            # (2 * M of them) per template, plus its own overhead; measured in
            # docs/benchmarks.md ("Galleries": m = 32 overflowed the 8-byte sizing).
            memory_mb = int(min(8192, max(64, templates * (gallery.dimensions * 4 + HNSW_M * 2 * 16 + 256) * 1.25
                                          / 2**20)))
            started = time.perf_counter()
            conn.execute("SET statement_timeout = 0")
            conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory_mb}MB")))
            # A build that died half-way leaves an invalid index behind, which IF NOT EXISTS would keep.
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(gallery.index_name))
            conn.execute(sql.SQL(
                "CREATE INDEX CONCURRENTLY {} ON {} USING hnsw (embedding vector_cosine_ops) "
                "WITH (m = {}, ef_construction = {})"
            ).format(gallery.index_name, gallery.table, sql.Literal(HNSW_M), sql.Literal(HNSW_EF_CONSTRUCTION)))
            conn.execute("UPDATE ident_galleries SET indexed_at = now() WHERE id = %s", (gallery.id,))
            log.info("gallery %r: HNSW index over %d templates built in %.1f s", gallery.name, templates,
                     time.perf_counter() - started)
        finally:
            if not conn.broken:
                conn.execute("RESET statement_timeout")
                conn.execute("RESET maintenance_work_mem")
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", (INDEX_LOCK_CLASS, gallery.id))

    def _find(self, conn: psycopg.Connection, name: str) -> Gallery | None:
        row = conn.execute(_GALLERY_QUERY + " WHERE g.name = %s", (name,)).fetchone()
        return None if row is None else Gallery(*row)

    def _existing(self, conn: psycopg.Connection, name: str) -> Gallery:
        gallery = self._find(conn, name)
        if gallery is None:
            raise GalleryNotFound(f"gallery {name!r} does not exist: enrol a subject into it first "
                                  "(vision.enroll or audio.enroll creates it), or see `ident gallery list`")
        return gallery

    def _all(self, conn: psycopg.Connection) -> list[Gallery]:
        return [Gallery(*row) for row in conn.execute(_GALLERY_QUERY + " ORDER BY g.name").fetchall()]


def _lock_inserts(conn: psycopg.Connection, gallery: Gallery) -> None:
    """Hold the gallery's insert lock until this transaction ends, so that ids are drawn in commit order."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (INSERT_LOCK_CLASS, gallery.id))


def table_name(gallery_id: int) -> str:
    """Where a gallery's templates live: a table of its own (see the module's docstring)."""
    return f"ident_templates_{gallery_id}"


def _check_model(gallery: Gallery, model: EmbeddingModel) -> None:
    if gallery.modality != model.modality:
        raise GalleryMismatch(
            f"gallery {gallery.name!r} holds {gallery.modality} templates, not {model.modality}: use "
            f"{gallery.modality}.enroll/identify with it, or another gallery name for {model.modality}"
        )
    if (gallery.model, gallery.model_sha256) != (model.key, model.sha256):
        raise GalleryMismatch(
            f"gallery {gallery.name!r} holds templates of {gallery.model} (sha256 {gallery.model_sha256[:12]}), "
            f"but this worker embeds with {model.key} (sha256 {model.sha256[:12]}); templates of different models "
            f"cannot be compared. Re-enrol its subjects into a new gallery with {model.key} "
            f"(ident gallery enroll), or run workers with {gallery.model}"
        )


def _loaded(embedding: object) -> np.ndarray:
    """A vector column's value as float32: pgvector-python 0.4 and newer load a Vector, older ones an ndarray."""
    to_numpy = getattr(embedding, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy is not None else embedding, dtype=np.float32)


def _vector(embedding: np.ndarray, dimensions: int) -> np.ndarray:
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vector.shape[0] != dimensions:
        raise InvalidInput(f"an embedding of {vector.shape[0]} dimensions cannot join a gallery of {dimensions}")
    if not np.isfinite(vector).all():
        raise InvalidInput("the embedding holds NaN or infinite values")
    return vector
