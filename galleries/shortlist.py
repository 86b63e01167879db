"""A worker process's compressed copy of a large gallery, which names the templates PostgreSQL then scores.

Why
    pgvector 0.6's HNSW (what the embedded server ships) finds the right
    subject for under half the probes of a 10⁶-template gallery at 21 ms, and
    no graph or server setting tried brings it near recall@1 0.99 under 10 ms
    (docs/benchmarks.md, "Galleries"). A scan of every template, compressed,
    is both faster and more exact there.
What
    faiss's product-quantisation fast scan (``IndexPQFastScan``): each
    template is cut into pairs of dimensions and each pair stored as one of 16
    centroids, 4 bits, so a 128-d face template takes 32 bytes (32 MB for 10⁶)
    and a probe is compared with all of them through SIMD lookup tables in a
    few milliseconds. It names the :data:`SHORTLIST_ROWS` nearest templates;
    the store (galleries/store.py) scores those exactly in PostgreSQL, with
    every row enrolled since the copy was made, so the answer is the store of
    record's: a deleted row drops out, a new row counts from its first search.
Freshness
    Template ids grow in commit order (the store takes a per-gallery lock
    before it inserts), so the rows a copy lacks are exactly those with an id
    above its :attr:`Shortlist.last_id`. Rows found deleted are remembered and
    skipped; past :data:`REBUILD_AFTER_GONE` of them the copy is rebuilt.

Nothing here reads the database or logs a template: :class:`Shortlist` is
numpy in, row ids out, and :class:`ShortlistCache` builds copies through a
function the store gives it, on a thread of their own, while searches go
through HNSW.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

# Templates named per probe. In 10⁶-template galleries of 128-d synthetic identities
# the exact nearest template was among the 192 named for 300 of 300, 500 of 500 and
# 499 of 500 probes (three builds), among the 128 for 297 of 300 and 500 of 500; each
# 64 more cost ~0.4 ms of PostgreSQL's time (docs/benchmarks.md, "Galleries").
SHORTLIST_ROWS = 192
# Rows enrolled since the copy was made are scored exactly by PostgreSQL until
# there are this many, then added to the copy (a few milliseconds per thousand).
EXTEND_AFTER_ROWS = 1_000
# Rows found deleted before the copy is rebuilt: each one widens every search by one.
REBUILD_AFTER_GONE = SHORTLIST_ROWS
# Centroids per pair of dimensions are trained on a random sample of this many templates.
TRAINING_SAMPLE = 32_768
# faiss's advice for k-means: 39 points per centroid at least (16 centroids at 4 bits).
# A smaller gallery's templates are repeated up to it; its shortlist names all its
# rows anyway while it holds no more than SHORTLIST_ROWS.
MIN_TRAINING = 39 * 16
# A build that failed is tried again after this long; searches meanwhile go through HNSW.
RETRY_AFTER_S = 60.0
BITS_PER_CODE = 4  # what faiss's fast scan takes


def _faiss():
    # faiss's loader first looks for a module per instruction set, which wheels built
    # for dynamic dispatch (1.10 and newer) do not have, and says so at INFO in words
    # that read as a fault; what it settled on is logged below.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    # One probe at a time per process: the worker's pool processes are the
    # parallelism, as with ONNX Runtime's threads (IDENT_CPU_THREADS).
    faiss.omp_set_num_threads(1)
    return faiss


def subquantizers(dimensions: int) -> int:
    """Pairs of dimensions where the dimensions are even; one code per dimension otherwise."""
    return dimensions // 2 if dimensions % 2 == 0 else dimensions


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so that an inner product is the cosine PostgreSQL computes."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class Shortlist:
    """One gallery's compressed templates: which rows are nearest a probe."""

    def __init__(self, gallery_id: int, dimensions: int, training: np.ndarray) -> None:
        if len(training) == 0:
            raise ValueError("a shortlist is trained on at least one template")
        faiss = _faiss()
        self.gallery_id = gallery_id
        self.dimensions = dimensions
        self._index = faiss.IndexPQFastScan(dimensions, subquantizers(dimensions), BITS_PER_CODE,
                                            faiss.METRIC_INNER_PRODUCT)
        training = _unit(training)
        if len(training) < MIN_TRAINING:
            training = np.resize(training, (MIN_TRAINING, dimensions))
        self._index.train(training)
        self._row_ids = np.empty(0, dtype=np.int64)
        self.last_id = 0
        self.gone: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._row_ids)

    @property
    def nbytes(self) -> int:
        """Memory held: the codes and the row ids."""
        return int(self._index.ntotal * self._index.code_size + self._row_ids.nbytes)

    def add(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Rows in ascending id order, all above :attr:`last_id`."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if len(row_ids) == 0:
            return
        if row_ids[0] <= self.last_id or np.any(np.diff(row_ids) <= 0):
            raise ValueError("rows are added in ascending id order, after the last one added")
        with self._lock:
            self._index.add(_unit(vectors))
            self._row_ids = np.concatenate([self._row_ids, row_ids])
            self.last_id = int(row_ids[-1])

    def nearest(self, probe: np.ndarray, count: int) -> np.ndarray:
        """The ids of the ``count`` rows nearest ``probe`` (fewer when the copy holds fewer), rows known gone left out."""
        with self._lock:
            wanted = min(count + len(self.gone), len(self._row_ids))
            if wanted == 0:
                return np.empty(0, dtype=np.int64)
            _, labels = self._index.search(_unit(probe.reshape(1, -1)), wanted)
            found = self._row_ids[labels[0][labels[0] >= 0]]
        if self.gone:
            found = found[~np.isin(found, np.fromiter(self.gone, dtype=np.int64))]
        return found[:count]

    def mark_gone(self, row_ids) -> None:
        self.gone.update(int(r) for r in row_ids)

    @property
    def worn(self) -> bool:
        """Whether enough of its rows were found deleted that it should be built again."""
        return len(self.gone) >= REBUILD_AFTER_GONE


@dataclass
class _Entry:
    shortlist: Shortlist | None = None
    building: threading.Thread | None = None
    built_s: float | None = None
    problem: str | None = None
    failed_at: float | None = None
    name: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class ShortlistCache:
    """This process's shortlists, one per large gallery, each built on a thread of its own when first asked for.

    ``build(gallery)`` is the store's: it reads the gallery's templates on a
    connection of its own and returns a filled :class:`Shortlist`.
    """

    def __init__(self, build: Callable[[object], Shortlist]) -> None:
        self._build = build
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()

    def ready(self, gallery) -> Shortlist | None:
        """The gallery's shortlist if this process has one; otherwise None, and one is being built."""
        with self._lock:
            entry = self._entries.setdefault(gallery.id, _Entry(name=gallery.name))
            if entry.shortlist is not None and not entry.shortlist.worn:
                return entry.shortlist
            retry_due = entry.failed_at is None or time.monotonic() - entry.failed_at >= RETRY_AFTER_S
            if entry.building is None and retry_due:
                entry.done.clear()
                entry.building = threading.Thread(target=self._run_build, args=(gallery, entry),
                                                  name=f"shortlist-{gallery.id}", daemon=True)
                entry.building.start()
            return entry.shortlist  # a worn one still answers rightly, only wider, until its successor is ready

    def wait(self, gallery, timeout_s: float) -> Shortlist:
        """The gallery's shortlist, built now if need be (the benchmark's and the tests' way to time it)."""
        self.ready(gallery)
        entry = self._entries[gallery.id]
        if not entry.done.wait(timeout_s) and entry.shortlist is None:
            raise TimeoutError(f"the shortlist of gallery {gallery.name!r} was not built in {timeout_s:g} s")
        if entry.shortlist is None:
            raise RuntimeError(f"the shortlist of gallery {gallery.name!r} could not be built: {entry.problem}")
        return entry.shortlist

    def status(self) -> dict:
        """Per gallery: templates held, memory, build time, and why the last build failed if it did."""
        with self._lock:
            return {
                entry.name: {
                    "templates": len(entry.shortlist) if entry.shortlist is not None else 0,
                    "bytes": entry.shortlist.nbytes if entry.shortlist is not None else 0,
                    "state": "ready" if entry.shortlist is not None else (
                        "building" if entry.building is not None else "failed"),
                    "built_s": entry.built_s,
                    "problem": entry.problem,
                }
                for entry in self._entries.values()
            }

    def _run_build(self, gallery, entry: _Entry) -> None:
        started = time.perf_counter()
        try:
            shortlist = self._build(gallery)
        except Exception as exc:  # reported in status and the log; searches go on through HNSW
            with self._lock:
                entry.problem = f"{type(exc).__name__}: {exc}"
                entry.failed_at = time.monotonic()
                entry.building = None
            log.warning("gallery %r: its shortlist could not be built (%s); searching through HNSW, trying again "
                        "in %.0f s", gallery.name, entry.problem, RETRY_AFTER_S)
        else:
            with self._lock:
                entry.shortlist = shortlist
                entry.built_s = round(time.perf_counter() - started, 3)
                entry.problem = entry.failed_at = None
                entry.building = None
            log.info("gallery %r: shortlist of %d templates (%.1f MB) built in %.1f s", gallery.name,
                     len(shortlist), shortlist.nbytes / 1e6, entry.built_s)
        finally:
            entry.done.set()
