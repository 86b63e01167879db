"""``ident bench --kind gallery``: 1:N search of one gallery on PostgreSQL + pgvector, exact and through HNSW.

The gallery is synthetic, so that any size can be measured without photos or
recordings, and so that the right answer of every search is known:

Identities
    Each subject is a random unit vector ``c`` of ``--dimensions`` (128, the
    face model's; 192 for the speaker model). A template or a probe of that
    subject is ``normalize(c + sigma * n)``, ``n`` standard normal, with
    ``sigma = sqrt((1/g - 1) / d)``: then ``|c + sigma n|^2 ~ 1 + sigma^2 d =
    1/g`` while the dot product of two such draws stays ~1, so two templates
    of one subject have a cosine of about ``g`` (``--genuine-mean``, 0.62 by
    default, near what the face model gives for two photos of one person).
    Two subjects' vectors are nearly orthogonal (cosine ~0 +- 1/sqrt(d)), as
    the models' impostor scores are. The report gives the cosines measured.
Probes
    Most are genuine: a fresh draw around a random enrolled subject. The rest
    (``--strangers``, a share) are draws around subjects never enrolled: the
    case where HNSW is weakest, since a stranger's nearest templates are all
    about equally far.

Steps, each with a progress bar:

1. Start the embedded PostgreSQL (galleries/embedded.py) under a temporary
   folder, or ``--data-dir``, or use IDENT_GALLERY_URL; a fresh gallery.
2. Bulk-load the templates through :meth:`GalleryStore.bulk_load` in the
   chunks ``ident gallery import`` uses (``enroll_per_s``). At each size of
   :data:`EXACT_SIZES` on the way, up to :data:`EXACT_MAX_TEMPLATES`, time the
   store's exact search: where its p99 passes ``--target-ms`` is where a
   gallery should switch to its index (IDENT_GALLERY_INDEX_MIN_TEMPLATES).
3. ``VACUUM (ANALYZE)``, as autovacuum would soon after a bulk load, so that
   it does not run in the middle of the timings (``vacuum_s``, not in any
   other figure).
4. Build the HNSW index through :meth:`GalleryStore.build_index`, whatever
   the size (``index_build_s``): the bench measures the indexed path.
5. Search every probe through :meth:`GalleryStore.identify` with HNSW
   alone (no shortlist: what a process does while its shortlist is being
   built), one probe per call, one call after another, at each
   ``ef_search`` of ``--ef-sweep``.
6. Build the store's shortlist of the gallery (galleries/shortlist.py,
   ``shortlist_build_s``) and search every probe again through it, as a
   worker does once it has one: these are the headline figures.

``recall_at_1`` is the share of probes whose top subject is the exact top
subject; the exact answer is computed here with numpy over the same float32
templates (at sizes the database also scans exactly, the report says how
often the two agree: ``exact[].agrees_with_numpy``). The HNSW figures under
``hnsw`` are those at ``--ef-search`` (default IDENT_GALLERY_EF_SEARCH). The
database's CPU and this process's are told apart from the rest of the
machine's (``machine_load``): a figure measured while something else kept
the cores busy says so.

At the end the gallery is dropped, and a server this bench started is stopped
and a folder it created removed, on Ctrl-C, SIGTERM and errors too; ``--keep``
keeps all three for a look with psql.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ident.arguments import count, counts
from tasks.errors import IdentError

if TYPE_CHECKING:
    import numpy as np
# numpy, psycopg and the gallery code are imported where they are used: `ident`
# builds this parser for every command, and producers install no numpy.

DEFAULT_TEMPLATES = 10_000
DEFAULT_DIMENSIONS = 128
SPEAKER_DIMENSIONS = 192
DEFAULT_GENUINE_MEAN = 0.62
DEFAULT_TEMPLATES_PER_SUBJECT = 2
DEFAULT_PROBES = 500
DEFAULT_STRANGERS = 0.1
DEFAULT_EF_SWEEP = (40, 64, 100, 200)
DEFAULT_EXACT_PROBES = 100
DEFAULT_SEED = 20_240_601
# The figures the defaults are chosen against (docs/benchmarks.md, "Galleries").
TARGET_MS = 10.0
TARGET_RECALL = 0.99
# Sizes at which the store's exact search is timed on the way to --templates: a
# 1-2-5 ladder, so the crossover is bracketed within a factor of 2.5.
EXACT_SIZES = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
# Above this, one exact search scans hundreds of MB: its latency is far past any
# target and 100 of them would take minutes, for no decision.
EXACT_MAX_TEMPLATES = 100_000
# Untimed searches before each timed series: the first searches of a fresh
# connection, or just after a build, read pages that later ones find cached.
WARMUP_PROBES = 50
EXACT_WARMUP_PROBES = 3
ROUND_TRIPS = 200
# Templates compared with the probes per numpy block: 65536 x 500 probes of
# float32 scores is 128 MB, whatever the gallery's size.
TRUTH_BLOCK = 65_536
# While the bench loads and searches, the gallery must not index itself behind
# its back: the index is built once, when the bench says so.
NEVER = 2**62

# Server settings the figures depend on, copied into the report.
SERVER_SETTINGS = ("server_version", "shared_buffers", "work_mem", "maintenance_work_mem", "effective_cache_size",
                   "max_parallel_workers_per_gather", "max_parallel_maintenance_workers", "max_parallel_workers",
                   "jit")

# --- arguments ---------------------------------------------------------------------


def _fraction(low: float, high: float, closed_low: bool):
    """An argparse type: a number in (low, high), or [low, high) with ``closed_low``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ((low <= value if closed_low else low < value) and value < high):
            bracket = "[" if closed_low else "("
            raise argparse.ArgumentTypeError(f"expected a number in {bracket}{low:g}, {high:g}), got {text!r}")
        return value

    return parse


def add_arguments(parser) -> None:
    """The options of --kind gallery, all None (or False) when not given, so other kinds can refuse them."""
    group = parser.add_argument_group("--kind gallery", "1:N search on PostgreSQL + pgvector over synthetic "
                                      "templates (ident/gallery_bench.py)")
    group.add_argument("--templates", type=count(2), metavar="N", help=f"templates in the gallery (default: {DEFAULT_TEMPLATES})")
    group.add_argument("--dimensions", type=count(2),
                       help=f"embedding size (default: {DEFAULT_DIMENSIONS}, the face model; "
                            f"{SPEAKER_DIMENSIONS}: the speaker model)")
    group.add_argument("--genuine-mean", type=_fraction(0.0, 1.0, False),
                       help=f"mean cosine of two templates of one subject (default: {DEFAULT_GENUINE_MEAN})")
    group.add_argument("--templates-per-subject", type=count(1),
                       help=f"templates of each subject (default: {DEFAULT_TEMPLATES_PER_SUBJECT})")
    group.add_argument("--probes", type=count(1), help=f"timed searches per ef_search (default: {DEFAULT_PROBES})")
    group.add_argument("--strangers", type=_fraction(0.0, 1.0, True),
                       help=f"share of the probes from subjects not enrolled (default: {DEFAULT_STRANGERS})")
    group.add_argument("--ef-search", type=count(1),
                       help="the ef_search of the HNSW figures (default: IDENT_GALLERY_EF_SEARCH); "
                            "always part of the sweep")
    group.add_argument("--ef-sweep", type=counts(1),
                       help="comma list of ef_search values to measure recall and latency at "
                            f"(default: {','.join(map(str, DEFAULT_EF_SWEEP))})")
    group.add_argument("--exact-probes", type=count(1),
                       help=f"timed exact searches at each size up to {EXACT_MAX_TEMPLATES} "
                            f"(default: {DEFAULT_EXACT_PROBES})")
    group.add_argument("--target-ms", type=_fraction(0.0, math.inf, False),
                       help=f"the p99 latency an exact search may reach before a gallery should be indexed "
                            f"(default: {TARGET_MS:g})")
    group.add_argument("--hnsw-m", type=count(2),
                       help="HNSW m to build with instead of galleries/store.py's HNSW_M, to try another")
    group.add_argument("--ef-construction", type=count(4),
                       help="HNSW ef_construction instead of galleries/store.py's HNSW_EF_CONSTRUCTION")
    group.add_argument("--parallel-workers", type=count(0),
                       help="max_parallel_maintenance_workers for the build (default: the server's)")
    group.add_argument("--maintenance-work-mem", type=count(64), metavar="MB",
                       help="build with this maintenance_work_mem instead of the store's own sizing: the bench "
                            "then runs the store's CREATE INDEX itself (default: GalleryStore.build_index)")
    group.add_argument("--data-dir", type=Path,
                       help="where the embedded PostgreSQL lives (default: a temporary folder; ignored with "
                            "IDENT_GALLERY_URL)")
    group.add_argument("--keep", action="store_true",
                       help="keep the gallery, the server and its folder at the end")
    group.add_argument("--seed", type=count(0), help=f"random seed of the identities (default: {DEFAULT_SEED})")


GALLERY_OPTIONS = ("templates", "dimensions", "genuine_mean", "templates_per_subject", "probes", "strangers",
                   "ef_search", "ef_sweep", "exact_probes", "target_ms", "hnsw_m", "ef_construction",
                   "parallel_workers", "maintenance_work_mem", "data_dir", "seed")


def refuse_gallery_options(args) -> None:
    """IdentError when an option of --kind gallery is given to another kind, which would ignore it."""
    given = [f"--{name.replace('_', '-')}" for name in GALLERY_OPTIONS if getattr(args, name, None) is not None]
    if getattr(args, "keep", False):
        given.append("--keep")
    if given:
        raise IdentError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of "
                         f"--kind gallery, not of --kind {args.kind}")


@dataclass(frozen=True)
class Plan:
    """What one run measures, every default resolved."""

    templates: int
    dimensions: int
    genuine_mean: float
    per_subject: int
    probes: int
    strangers: float
    ef_search: int
    ef_sweep: tuple[int, ...]
    exact_probes: int
    target_ms: float
    hnsw_m: int | None
    ef_construction: int | None
    parallel_workers: int | None
    maintenance_work_mem: int | None
    data_dir: Path | None
    keep: bool
    seed: int

    @property
    def subjects(self) -> int:
        return -(-self.templates // self.per_subject)


def plan_from(args) -> Plan:
    from tasks.settings import load_settings

    import galleries.store as store_module

    ef_search = args.ef_search or load_settings().gallery_ef_search
    m = store_module.HNSW_M if args.hnsw_m is None else args.hnsw_m
    ef_construction = store_module.HNSW_EF_CONSTRUCTION if args.ef_construction is None else args.ef_construction
    if ef_construction < 2 * m:
        # pgvector refuses such an index, but only once the templates are loaded: say so now.
        raise IdentError(f"pgvector needs ef_construction >= 2 * m: m {m} needs --ef-construction {2 * m} or more")
    sweep = tuple(sorted({*(args.ef_sweep or DEFAULT_EF_SWEEP), ef_search}))

    def chosen(value, default):
        return default if value is None else value

    return Plan(
        templates=chosen(args.templates, DEFAULT_TEMPLATES),
        dimensions=chosen(args.dimensions, DEFAULT_DIMENSIONS),
        genuine_mean=chosen(args.genuine_mean, DEFAULT_GENUINE_MEAN),
        per_subject=chosen(args.templates_per_subject, DEFAULT_TEMPLATES_PER_SUBJECT),
        probes=chosen(args.probes, DEFAULT_PROBES),
        strangers=chosen(args.strangers, DEFAULT_STRANGERS),
        ef_search=ef_search,
        ef_sweep=sweep,
        exact_probes=chosen(args.exact_probes, DEFAULT_EXACT_PROBES),
        target_ms=chosen(args.target_ms, TARGET_MS),
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        parallel_workers=args.parallel_workers,
        maintenance_work_mem=args.maintenance_work_mem,
        data_dir=args.data_dir,
        keep=args.keep,
        seed=chosen(args.seed, DEFAULT_SEED),
    )


# --- synthetic identities ------------------------------------------------------------


def noise_sigma(genuine_mean: float, dimensions: int) -> float:
    """The noise that gives two draws around one subject a mean cosine of ``genuine_mean`` (module docstring)."""
    return math.sqrt((1.0 / genuine_mean - 1.0) / dimensions)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    import numpy as np

    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


@dataclass
class Identities:
    templates: np.ndarray  # (N, d) float32 unit rows, in loading order
    subjects: np.ndarray  # (N,) the subject of each template
    probes: np.ndarray  # (P, d) float32 unit rows
    probe_subjects: np.ndarray  # (P,) the subject a probe was drawn around; -1 for a stranger
    warmup: np.ndarray  # genuine probes for the untimed searches, none of them timed
    sigma: float


def synthesize(plan: Plan, warmup: int = WARMUP_PROBES) -> Identities:
    """Every template and probe of the run, made up front so that loading times the store, not numpy.

    Templates of one subject are consecutive, so a prefix of the templates is
    a gallery of whole subjects (the last one perhaps short of templates).
    """
    import numpy as np

    rng = np.random.default_rng(plan.seed)
    d, sigma = plan.dimensions, noise_sigma(plan.genuine_mean, plan.dimensions)
    centres = _unit_rows(rng.standard_normal((plan.subjects, d), dtype=np.float32))
    subjects = np.arange(plan.templates, dtype=np.int64) // plan.per_subject
    templates = np.empty((plan.templates, d), dtype=np.float32)
    for start in range(0, plan.templates, TRUTH_BLOCK):
        stop = min(plan.templates, start + TRUTH_BLOCK)
        block = centres[subjects[start:stop]] + sigma * rng.standard_normal((stop - start, d), dtype=np.float32)
        templates[start:stop] = _unit_rows(block)

    def around(chosen: np.ndarray, points: np.ndarray) -> np.ndarray:
        return _unit_rows(points[chosen] + sigma * rng.standard_normal((len(chosen), d), dtype=np.float32))

    strangers = round(plan.probes * plan.strangers)
    genuine = rng.integers(0, plan.subjects, plan.probes - strangers)
    outsiders = _unit_rows(rng.standard_normal((strangers, d), dtype=np.float32))
    probes = np.concatenate([around(genuine, centres), around(np.arange(strangers), outsiders)])
    probe_subjects = np.concatenate([genuine, np.full(strangers, -1, dtype=np.int64)])
    order = rng.permutation(plan.probes)  # strangers spread through the series, not all at its end
    return Identities(templates, subjects, probes[order], probe_subjects[order],
                      around(rng.integers(0, plan.subjects, warmup), centres), sigma)


def measured_scores(ids: Identities, rng_seed: int, sample: int = 20_000) -> dict:
    """Genuine and impostor cosines of a sample of template pairs, to show the identities are as asked."""
    import numpy as np

    rng = np.random.default_rng(rng_seed + 1)
    n = len(ids.templates)
    # Genuine: template j and j+1 of one subject (consecutive by construction).
    firsts = np.flatnonzero(ids.subjects[:-1] == ids.subjects[1:])
    firsts = firsts if len(firsts) <= sample else rng.choice(firsts, sample, replace=False)
    genuine = np.einsum("ij,ij->i", ids.templates[firsts], ids.templates[firsts + 1]) if len(firsts) else None
    a, b = rng.integers(0, n, sample), rng.integers(0, n, sample)
    apart = ids.subjects[a] != ids.subjects[b]
    impostor = np.einsum("ij,ij->i", ids.templates[a[apart]], ids.templates[b[apart]])
    return {
        "genuine_mean": None if genuine is None else round(float(genuine.mean()), 4),
        "genuine_std": None if genuine is None else round(float(genuine.std()), 4),
        "impostor_mean": round(float(impostor.mean()), 4),
        "impostor_std": round(float(impostor.std()), 4),
    }


def nearest_subjects(probes: np.ndarray, templates: np.ndarray, subjects: np.ndarray, upto: int) -> np.ndarray:
    """The exact top-1 subject of each probe among the first ``upto`` templates.

    A subject's score is its best template's (as in the store), so the top
    subject is the subject of the single nearest template.
    """
    import numpy as np

    best_score = np.full(len(probes), -np.inf, dtype=np.float32)
    best = np.zeros(len(probes), dtype=np.int64)
    rows = np.arange(len(probes))
    for start in range(0, upto, TRUTH_BLOCK):
        scores = probes @ templates[start:min(upto, start + TRUTH_BLOCK)].T
        column = scores.argmax(axis=1)
        score = scores[rows, column]
        better = score > best_score
        best[better] = start + column[better]
        best_score[better] = score[better]
    return subjects[best]


def subject_name(subject: int) -> str:
    return f"subject-{subject:07d}"


def template_rows(ids: Identities, start: int, stop: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """(subject_id, source, embedding) as an import feeds bulk_load.

    A real source is the payload's sha256 ("sha256:" + 64 hex digits): the
    same here, of the template's number, so that rows and the (subject_id,
    source) unique index are their real size.
    """
    for j in range(start, stop):
        source = "sha256:" + hashlib.sha256(j.to_bytes(8, "little")).hexdigest()
        yield subject_name(int(ids.subjects[j])), source, ids.templates[j]


# --- figures -----------------------------------------------------------------------------


def latency_figures(seconds: Sequence[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds) * 1000.0
    p50, p99 = np.percentile(ms, [50, 99])
    return {"search_ms_p50": round(float(p50), 3), "search_ms_p99": round(float(p99), 3),
            "search_ms_mean": round(float(ms.mean()), 3), "search_ms_max": round(float(ms.max()), 3)}


def recall_figures(found: Sequence[str | None], truth: np.ndarray, probe_subjects: np.ndarray) -> dict:
    """recall@1 over all probes, and over genuine probes and strangers apart (None when there are none)."""
    import numpy as np

    hit = np.array([f == subject_name(int(t)) for f, t in zip(found, truth)])
    stranger = probe_subjects < 0

    def share(mask: np.ndarray) -> float | None:
        return round(float(hit[mask].mean()), 4) if mask.any() else None

    return {"recall_at_1": share(np.ones_like(hit)), "recall_genuine": share(~stranger),
            "recall_strangers": share(stranger)}


def exact_crossover(points: Sequence[dict], target_ms: float) -> dict:
    """Where the exact search's p99 passes ``target_ms``: the first size measured over it, and an estimate.

    The estimate interpolates linearly between the sizes either side (an exact
    search's time grows with the templates it reads); when no size measured
    was over, it extrapolates the line through the two largest, and says so.
    """
    result = {"target_ms": target_ms, "first_size_over": None, "last_size_under": None,
              "estimated_templates": None, "estimate": None}
    if not points:
        return result
    over = [p for p in points if p["search_ms_p99"] > target_ms]
    under = [p for p in points if p["search_ms_p99"] <= target_ms]
    result["first_size_over"] = over[0]["templates"] if over else None
    result["last_size_under"] = under[-1]["templates"] if under else None
    if over and under and under[-1]["templates"] < over[0]["templates"]:
        low, high, result["estimate"] = under[-1], over[0], "interpolated"
    elif not over and len(points) >= 2:
        low, high, result["estimate"] = points[-2], points[-1], "extrapolated"
    else:
        return result  # over at the smallest size measured: only a bound
    slope = (high["search_ms_p99"] - low["search_ms_p99"]) / (high["templates"] - low["templates"])
    if slope > 0:
        result["estimated_templates"] = int(round(low["templates"] + (target_ms - low["search_ms_p99"]) / slope,
                                                  -2))
    return result


# --- what else the machine was doing -------------------------------------------------------


class MachineLoad:
    """CPU seconds, phase by phase: this process and the database server against the rest of the machine.

    On a shared machine a latency figure means little without knowing what
    else ran: a background thread samples every process's CPU time every
    :attr:`INTERVAL_S` and adds each one's growth to the phase under way.
    "ours" is this process and the server's processes (its postmaster and
    every child: backends, parallel workers); with IDENT_GALLERY_URL the
    server is not known and counts among the others if it is on this host.
    A process that starts and ends between two samples is missed (the machine
    total, from /proc/stat, is not).
    """

    INTERVAL_S = 2.0

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.server_pid: int | None = None
        self.phases: dict[str, dict] = {}
        self._phase = "start"
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, float], float] = {}
        self._machine = self._machine_busy()
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="machine-load", daemon=True)
        self._thread.start()

    def enter(self, phase: str) -> None:
        """End the phase under way (its last growth counted to it) and start ``phase``."""
        self._sample()
        with self._lock:
            self._close_phase()
            self._phase = phase
            self._started = time.monotonic()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        with self._lock:
            self._close_phase()
        return {name: figures for name, figures in self.phases.items() if name != "start"}

    def _close_phase(self) -> None:
        figures = self.phases.setdefault(self._phase, {"wall_s": 0.0, "machine_busy_cpu_s": 0.0, "ours_cpu_s": 0.0,
                                                       "others_cpu_s": 0.0, "others_top": {}})
        figures["wall_s"] = round(figures["wall_s"] + time.monotonic() - self._started, 2)
        busy = self._machine_busy()
        figures["machine_busy_cpu_s"] = round(figures["machine_busy_cpu_s"] + busy - self._machine, 2)
        self._machine = busy
        cores = os.cpu_count() or 1
        figures["others_share_of_machine"] = round(figures["others_cpu_s"] / max(1e-9, figures["wall_s"] * cores), 3)

    def _machine_busy(self) -> float:
        times = self._psutil.cpu_times()
        return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))

    def _loop(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        psutil = self._psutil
        me = os.getpid()
        with self._lock:
            figures = self.phases.setdefault(self._phase, {"wall_s": 0.0, "machine_busy_cpu_s": 0.0,
                                                           "ours_cpu_s": 0.0, "others_cpu_s": 0.0, "others_top": {}})
            seen: dict[tuple[int, float], float] = {}
            for process in psutil.process_iter(["pid", "ppid", "name", "cpu_times", "create_time"]):
                info = process.info
                if info["cpu_times"] is None or info["create_time"] is None:
                    continue  # gone, or not ours to read
                key = (info["pid"], info["create_time"])
                used = info["cpu_times"].user + info["cpu_times"].system
                seen[key] = used
                grown = used - self._seen.get(key, used if self._seen == {} else 0.0)
                if grown <= 0:
                    continue
                server = self.server_pid is not None and self.server_pid in (info["pid"], info["ppid"])
                if info["pid"] == me or server:
                    figures["ours_cpu_s"] = round(figures["ours_cpu_s"] + grown, 2)
                else:
                    figures["others_cpu_s"] = round(figures["others_cpu_s"] + grown, 2)
                    name = info["name"] or "?"
                    figures["others_top"][name] = round(figures["others_top"].get(name, 0.0) + grown, 2)
            self._seen = seen
            top = sorted(figures["others_top"].items(), key=lambda item: -item[1])[:5]
            figures["others_top"] = dict(top)


# --- the database -------------------------------------------------------------------------


@dataclass
class Server:
    """The database the bench runs on, and what it must undo at the end."""

    url: str  # "" for the embedded server
    data_dir: Path
    started_here: bool  # an embedded server this bench started: stopped at the end
    created_dir: bool  # a folder this bench created: removed at the end

    @property
    def embedded(self) -> bool:
        return not self.url


def open_server(plan: Plan) -> Server:
    """IDENT_GALLERY_URL's server, or the embedded one under --data-dir or a new temporary folder, started."""
    from galleries import embedded
    from tasks.settings import load_settings

    url = load_settings().gallery_url
    if url:
        return Server(url, Path(tempfile.gettempdir()), started_here=False, created_dir=False)
    if plan.data_dir is None:
        data_dir, created = Path(tempfile.mkdtemp(prefix="ident-gallery-bench-")), True
    else:
        data_dir, created = plan.data_dir.resolve(), not plan.data_dir.exists()
    running = embedded.running_pid(data_dir) is not None
    server = Server("", data_dir, started_here=not running, created_dir=created)
    try:
        embedded.start(data_dir)
    except BaseException:
        close_server(server, keep=False, say=lambda _: None)  # a half-made folder of ours goes too
        raise
    return server


def close_server(server: Server, keep: bool, say: Callable[[str], None]) -> None:
    from galleries import embedded

    if not server.embedded:
        return
    if keep:
        if server.started_here:
            say(f"kept: the embedded PostgreSQL under {embedded.cluster_dir(server.data_dir)} is still running; "
                f"stop it with IDENT_DATA_DIR={server.data_dir} ident gallery stop-embedded")
        return
    if server.started_here:
        embedded.stop(server.data_dir)
    if server.created_dir:
        shutil.rmtree(server.data_dir, ignore_errors=True)


def drop_gallery(database, name: str, model_key: str) -> None:
    """Drop the bench's gallery, its table and (when no other gallery uses it) its model row.

    The store has no such operation: a gallery is an operator's, emptied
    subject by subject. The bench's gallery is its own, and on a shared
    server (IDENT_GALLERY_URL) it must not stay behind.
    """
    from psycopg import sql

    conn = database.connection()
    with conn.transaction():
        row = conn.execute("SELECT id FROM ident_galleries WHERE name = %s", (name,)).fetchone()
        if row is None:
            return
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"ident_templates_{row[0]}")))
        conn.execute("DELETE FROM ident_galleries WHERE id = %s", (row[0],))
        conn.execute("DELETE FROM ident_models m WHERE m.key = %s AND NOT EXISTS "
                     "(SELECT 1 FROM ident_galleries g WHERE g.model_id = m.id)", (model_key,))


def server_settings(conn) -> dict:
    return dict(conn.execute("SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name",
                             (list(SERVER_SETTINGS),)).fetchall())


@contextlib.contextmanager
def hnsw_build_parameters(m: int | None, ef_construction: int | None):
    """Build with another m or ef_construction through the store's own code, then put its constants back.

    GalleryStore._build_index reads galleries.store.HNSW_M and
    HNSW_EF_CONSTRUCTION when it runs, and sizes maintenance_work_mem from
    HNSW_M: swapping the two for one build measures a candidate setting with
    everything else the store does (its memory sizing, CONCURRENTLY, the
    advisory lock) unchanged, without editing the store.
    """
    import galleries.store as store_module

    saved = store_module.HNSW_M, store_module.HNSW_EF_CONSTRUCTION
    store_module.HNSW_M = saved[0] if m is None else m
    store_module.HNSW_EF_CONSTRUCTION = saved[1] if ef_construction is None else ef_construction
    try:
        yield store_module.HNSW_M, store_module.HNSW_EF_CONSTRUCTION
    finally:
        store_module.HNSW_M, store_module.HNSW_EF_CONSTRUCTION = saved


def watch_build(url: str, table: str, update: Callable[[str, int, int], None], done: threading.Event) -> None:
    """Report the index build's phase and heap blocks read, from pg_stat_progress_create_index, until ``done``.

    A connection of its own: the store's is busy with CREATE INDEX. pgvector
    inserts each tuple into the graph as the heap is scanned, so the blocks
    read are the build's progress; the CONCURRENTLY validation comes after.
    """
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True, application_name="identification-bench-progress") as conn:
            while not done.wait(0.5):
                row = conn.execute("SELECT phase, blocks_done, blocks_total FROM pg_stat_progress_create_index "
                                   "WHERE relid = %s::regclass", (table,)).fetchone()
                if row is not None:
                    update(row[0], int(row[1] or 0), int(row[2] or 0))
    except psycopg.Error:
        pass  # the progress bar only: the build itself reports its own failure


# --- the run ---------------------------------------------------------------------------------


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))


def time_searches(store, name: str, model, probes: np.ndarray, top_k: int,
                  advance: Callable[[], None] | None = None) -> tuple[list[float], list[str | None]]:
    """Each probe searched alone through GalleryStore.identify, one call after the other: seconds and top subject."""
    seconds, found = [], []
    for probe in probes:
        started = time.perf_counter()
        _, ranked = store.identify(name, [probe], model, top_k)
        seconds.append(time.perf_counter() - started)
        found.append(ranked[0][0].subject_id if ranked[0] else None)
        if advance is not None:
            advance()
    return seconds, found


def _round_trips(conn, times: int) -> list[float]:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        conn.execute("SELECT 1").fetchone()
        seconds.append(time.perf_counter() - started)
    return seconds


def load_stops(templates: int, chunk: int) -> list[int]:
    """Where loading pauses: every import chunk's end, and each size of EXACT_SIZES up to the gallery's."""
    stops = set(range(chunk, templates, chunk)) | {templates}
    stops |= {n for n in EXACT_SIZES if n < templates}
    return sorted(stops)


def exact_sizes(templates: int) -> list[int]:
    sizes = [n for n in EXACT_SIZES if n < templates]
    if templates <= EXACT_MAX_TEMPLATES:
        sizes.append(templates)
    return sizes


def bench(plan: Plan, say: Callable[[str], None]) -> dict:
    from galleries.database import Database
    from galleries.shortlist import SHORTLIST_ROWS
    from galleries.store import GalleryStore
    from galleries.transfer import CHUNK_TEMPLATES
    from psycopg import sql
    from tasks.settings import load_settings
    from workers.galleries import DEFAULT_TOP_K

    from ident.fleet import signals_held

    started = time.perf_counter()
    load = MachineLoad()
    load.enter("synthesize")
    ids = synthesize(plan)
    scores = measured_scores(ids, plan.seed)
    truth = nearest_subjects(ids.probes, ids.templates, ids.subjects, plan.templates)

    load.enter("start database")
    server = open_server(plan)
    from galleries import embedded

    if server.embedded:
        load.server_pid = embedded.running_pid(server.data_dir)
    database = Database(server.url, server.data_dir)
    model = _synthetic_model(plan.dimensions)
    name = f"bench-{uuid.uuid4().hex[:12]}"
    try:
        conn = database.connection()
        # Loading and exact timings first, so the gallery must not index itself on the way.
        loader = GalleryStore(database, index_min_templates=NEVER, ef_search=plan.ef_search, shortlists=False)
        exact: list[dict] = []
        loaded, load_s = 0, 0.0
        sizes = exact_sizes(plan.templates)
        with _progress() as progress:
            task = progress.add_task(f"loading {plan.templates} templates", total=plan.templates)
            for stop in load_stops(plan.templates, CHUNK_TEMPLATES):
                load.enter("load")
                t0 = time.perf_counter()
                loader.bulk_load(name, model, template_rows(ids, loaded, stop),
                                 lambda n: progress.advance(task, n))
                load_s += time.perf_counter() - t0
                progress.update(task, completed=stop)
                loaded = stop
                if stop in sizes:
                    load.enter("exact searches")
                    exact.append(measure_exact(loader, name, model, ids, plan, stop, DEFAULT_TOP_K, progress))

            load.enter("vacuum")
            t0 = time.perf_counter()
            gallery = loader.gallery(name)
            table = f"ident_templates_{gallery.id}"
            conn.execute("SET statement_timeout = 0")  # VACUUM of a large table runs past the store's 30 s cap
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
            conn.execute("RESET statement_timeout")
            vacuum_s = time.perf_counter() - t0

            load.enter("index build")
            build = build_index(loader, database, server, name, table, plan, progress)

            load.enter("indexed searches")
            sweep = []
            for ef in plan.ef_sweep:
                store = GalleryStore(database, index_min_templates=NEVER, ef_search=ef, shortlists=False)
                time_searches(store, name, model, ids.warmup, DEFAULT_TOP_K)
                task = progress.add_task(f"probes, ef_search {ef}", total=plan.probes)
                seconds, found = time_searches(store, name, model, ids.probes, DEFAULT_TOP_K,
                                               lambda: progress.advance(task))
                sweep.append({"ef_search": ef, **recall_figures(found, truth, ids.probe_subjects),
                              **latency_figures(seconds)})

            # What a worker does once its shortlist of the gallery is built (the store's default).
            load.enter("shortlist build")
            listed = GalleryStore(database, index_min_templates=NEVER, ef_search=plan.ef_search)
            task = progress.add_task("building the shortlist", total=None)
            t0 = time.perf_counter()
            shortlist = listed.shortlist(name)
            shortlist_build_s = time.perf_counter() - t0
            progress.update(task, description="shortlist built", completed=1, total=1)
            load.enter("shortlisted searches")
            time_searches(listed, name, model, ids.warmup, DEFAULT_TOP_K)
            task = progress.add_task("probes, shortlist", total=plan.probes)
            seconds, found = time_searches(listed, name, model, ids.probes, DEFAULT_TOP_K,
                                           lambda: progress.advance(task))
            shortlisted = {**recall_figures(found, truth, ids.probe_subjects), **latency_figures(seconds),
                           "build_s": round(shortlist_build_s, 2), "bytes": shortlist.nbytes,
                           "templates": len(shortlist), "rows_named": SHORTLIST_ROWS}

        # One trivial statement's round trip on the same connection: identify makes five
        # (the gallery's row, BEGIN, SET LOCAL hnsw.ef_search, the search, COMMIT), so
        # five of these are the floor under search_ms whatever the index does.
        round_trip = latency_figures(_round_trips(database.connection(), ROUND_TRIPS))
        sizes_row = conn.execute(
            "SELECT pg_total_relation_size(t), pg_table_size(t), pg_indexes_size(t), pg_relation_size(i) "
            "FROM (SELECT %s::regclass AS t, %s::regclass AS i) r", (table, f"{table}_hnsw")).fetchone()
        settings_now = server_settings(conn)
        pgvector = database.pgvector_version
    finally:
        with signals_held():
            load.enter("clean up")
            try:
                if not plan.keep:
                    with contextlib.suppress(Exception):  # a broken server: stopping it below is what is left
                        drop_gallery(database, name, model.key)
            finally:
                database.close()
                close_server(server, plan.keep, say)
    machine_load = load.stop()

    hnsw = next(row for row in sweep if row["ef_search"] == plan.ef_search)
    meeting = [row for row in sweep if row["recall_at_1"] >= TARGET_RECALL]
    genuine_meeting = [row for row in sweep if (row["recall_genuine"] or 0.0) >= TARGET_RECALL]
    at_size = exact[-1] if exact and exact[-1]["templates"] == plan.templates else None
    settings = load_settings()
    return {
        "kind": "gallery",
        "command": "ident " + shlex.join(sys.argv[1:]),
        "templates": plan.templates,
        # The headline is the search a worker makes: through its shortlist of the gallery.
        "search": "shortlist",
        "recall_at_1": shortlisted["recall_at_1"],
        "search_ms_p50": shortlisted["search_ms_p50"],
        "search_ms_p99": shortlisted["search_ms_p99"],
        "enroll_per_s": round(plan.templates / load_s, 1),
        "index_build_s": round(build["seconds"], 2),
        "shortlist_build_s": shortlisted["build_s"],
        "db_bytes": int(sizes_row[0]),
        "recall_genuine": shortlisted["recall_genuine"],
        "recall_strangers": shortlisted["recall_strangers"],
        "shortlist": shortlisted,
        # Through HNSW alone, as a process searches while its shortlist is built.
        "ef_search": plan.ef_search,
        "hnsw": {key: hnsw[key] for key in ("recall_at_1", "recall_genuine", "recall_strangers", "search_ms_p50",
                                            "search_ms_p99")},
        "exact_ms_p50": at_size["search_ms_p50"] if at_size else None,
        "exact_ms_p99": at_size["search_ms_p99"] if at_size else None,
        "targets": {
            "search_ms_p99": TARGET_MS, "recall_at_1": TARGET_RECALL,
            "met": shortlisted["search_ms_p99"] <= TARGET_MS and shortlisted["recall_at_1"] >= TARGET_RECALL,
            "met_by_hnsw_at_ef_search": hnsw["search_ms_p99"] <= TARGET_MS and hnsw["recall_at_1"] >= TARGET_RECALL,
            # The least ef_search swept whose recall@1 reaches the target, and its p99.
            "least_ef_search_for_recall": meeting[0]["ef_search"] if meeting else None,
            "p99_ms_at_least_ef_search": meeting[0]["search_ms_p99"] if meeting else None,
            # The same over genuine probes only: a stranger's top subject is refused by the
            # threshold whichever impostor it is, a genuine probe's is the match.
            "least_ef_search_for_genuine_recall": genuine_meeting[0]["ef_search"] if genuine_meeting else None,
        },
        "ef_sweep": sweep,
        "round_trip_ms": {"p50": round_trip["search_ms_p50"], "p99": round_trip["search_ms_p99"],
                          "statements": ROUND_TRIPS, "per_identify": 5},
        "exact": exact,
        "exact_crossover": exact_crossover(exact, plan.target_ms),
        "sizes": {"db_bytes": int(sizes_row[0]), "table_bytes": int(sizes_row[1]),
                  "indexes_bytes": int(sizes_row[2]), "hnsw_bytes": int(sizes_row[3])},
        "load": {"seconds": round(load_s, 2), "chunk_templates": CHUNK_TEMPLATES, "vacuum_s": round(vacuum_s, 2)},
        "index": build["report"],
        "identities": {
            "dimensions": plan.dimensions, "subjects": plan.subjects, "templates_per_subject": plan.per_subject,
            "genuine_mean_asked": plan.genuine_mean, "sigma": round(ids.sigma, 6), "measured": scores,
            "probes": plan.probes, "strangers": int((ids.probe_subjects < 0).sum()),
            "warmup_probes_per_series": len(ids.warmup), "top_k": DEFAULT_TOP_K, "seed": plan.seed,
        },
        "settings": {"ident_gallery_ef_search": settings.gallery_ef_search,
                     "ident_gallery_index_min_templates": settings.gallery_index_min_templates},
        "database": {"server": "embedded (pgserver)" if server.embedded else "IDENT_GALLERY_URL",
                     "pgvector": pgvector, "settings": settings_now},
        "machine": machine_facts(),
        "machine_load": machine_load,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def measure_exact(store, name: str, model, ids: Identities, plan: Plan, size: int, top_k: int, progress) -> dict:
    """The store's exact search timed at ``size`` templates (the gallery has no index yet)."""
    import numpy as np

    probes = ids.probes[:plan.exact_probes]
    time_searches(store, name, model, ids.warmup[:EXACT_WARMUP_PROBES], top_k)
    task = progress.add_task(f"exact searches at {size} templates", total=len(probes))
    seconds, found = time_searches(store, name, model, probes, top_k, lambda: progress.advance(task))
    truth = nearest_subjects(probes, ids.templates, ids.subjects, size)
    agree = float(np.mean([f == subject_name(int(t)) for f, t in zip(found, truth)]))
    figures = latency_figures(seconds)
    return {"templates": size, "search_ms_p50": figures["search_ms_p50"],
            "search_ms_p99": figures["search_ms_p99"], "search_ms_mean": figures["search_ms_mean"],
            "probes": len(probes), "agrees_with_numpy": round(agree, 4)}


def build_index(store, database, server: Server, name: str, table: str, plan: Plan, progress) -> dict:
    """GalleryStore.build_index, with its progress shown and the server's notices kept.

    pgvector says with a NOTICE when the graph outgrows maintenance_work_mem
    ("hnsw graph no longer fits into maintenance_work_mem"), after which the
    build slows down many times over: the report keeps every notice.
    """
    from galleries import embedded
    from psycopg import sql

    conn = database.connection()
    notices: list[str] = []

    def keep_notice(diagnostic) -> None:
        said = " ".join(filter(None, (diagnostic.message_primary, diagnostic.message_detail)))
        # The store's DROP INDEX IF EXISTS before every build says this; it is no finding.
        if not said.endswith("does not exist, skipping"):
            notices.append(said)

    conn.add_notice_handler(keep_notice)
    if plan.parallel_workers is not None:
        conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(plan.parallel_workers)))
    (workers,) = conn.execute("SELECT current_setting('max_parallel_maintenance_workers')::int").fetchone()
    task = progress.add_task("building the HNSW index (heap blocks)", total=None)
    done = threading.Event()

    def update(phase: str, blocks: int, total: int) -> None:
        progress.update(task, description=f"HNSW index: {phase}", completed=blocks, total=total or None)

    url = server.url or embedded.start(server.data_dir)
    watcher = threading.Thread(target=watch_build, args=(url, table, update, done), daemon=True)
    watcher.start()
    try:
        with hnsw_build_parameters(plan.hnsw_m, plan.ef_construction) as (m, ef_construction):
            if plan.maintenance_work_mem is None:
                seconds = store.build_index(name)
            else:
                seconds = build_with_memory(conn, store.gallery(name), m, ef_construction, plan.maintenance_work_mem)
    finally:
        done.set()
        watcher.join()
        conn.remove_notice_handler(keep_notice)
        if plan.parallel_workers is not None and not conn.broken:
            conn.execute("RESET max_parallel_maintenance_workers")
    progress.update(task, description="HNSW index built", completed=1, total=1)
    return {"seconds": seconds, "report": {
        "m": m, "ef_construction": ef_construction, "max_parallel_maintenance_workers": int(workers),
        "built_by": "GalleryStore.build_index" if plan.maintenance_work_mem is None else "the bench",
        "maintenance_work_mem_mb": plan.maintenance_work_mem,  # None: the store's own sizing
        "concurrently": True, "notices": notices,
        "fit_in_maintenance_work_mem": not any("no longer fits" in n for n in notices),
    }}


def build_with_memory(conn, gallery, m: int, ef_construction: int, memory_mb: int) -> float:
    """The store's index build with ``memory_mb`` of maintenance_work_mem; the seconds it took.

    GalleryStore._build_index sizes maintenance_work_mem itself, with no way
    to ask for more: to measure a build that fits in memory when the store's
    sizing falls short, the bench runs the same statements (the store's index
    name, CONCURRENTLY, the same operator class, indexed_at set after) with
    the memory given. No advisory lock: the gallery is the bench's alone.
    """
    from psycopg import sql

    started = time.perf_counter()
    conn.execute("SET statement_timeout = 0")
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory_mb}MB")))
    try:
        conn.execute(sql.SQL(
            "CREATE INDEX CONCURRENTLY {} ON {} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = {}, ef_construction = {})"
        ).format(gallery.index_name, gallery.table, sql.Literal(m), sql.Literal(ef_construction)))
        conn.execute("UPDATE ident_galleries SET indexed_at = now() WHERE id = %s", (gallery.id,))
    finally:
        if not conn.broken:
            conn.execute("RESET statement_timeout")
            conn.execute("RESET maintenance_work_mem")
    return time.perf_counter() - started


def _synthetic_model(dimensions: int):
    from galleries.store import EmbeddingModel

    key = f"bench-synthetic-{dimensions}d"
    # 192-d is the speaker model's size: such a gallery is an audio one, as it would be in service.
    modality = "audio" if dimensions == SPEAKER_DIMENSIONS else "vision"
    return EmbeddingModel(key, hashlib.sha256(key.encode()).hexdigest(), dimensions, modality)


def machine_facts() -> dict:
    import numpy as np

    model = ""
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    memory = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        memory = round(int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                                if line.startswith("MemTotal:"))) / 2**20, 1)
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def render(report: dict):
    from rich.table import Table

    table = Table(title=f"ident bench: gallery of {report['templates']} templates")
    table.add_column("measure")
    table.add_column("value", justify="right")
    exact = report["exact_crossover"]
    hnsw = report["hnsw"]
    rows = [
        ("recall@1 through the shortlist (genuine / strangers)",
         f"{report['recall_at_1']} ({report['recall_genuine']} / {report['recall_strangers']})"),
        ("search p50 / p99 (ms)", f"{report['search_ms_p50']} / {report['search_ms_p99']}"),
        (f"HNSW alone at ef_search {report['ef_search']}: recall@1, p50 / p99 ms",
         f"{hnsw['recall_at_1']}, {hnsw['search_ms_p50']} / {hnsw['search_ms_p99']}"),
        ("enrolment (templates/s, bulk load)", report["enroll_per_s"]),
        ("HNSW build (s)", report["index_build_s"]),
        ("shortlist build (s) and memory (bytes)",
         f"{report['shortlist_build_s']}, {report['shortlist']['bytes']:,}"),
        ("database bytes (table + indexes)", f"{report['db_bytes']:,}"),
        ("one statement's round trip p50 / p99 (ms)",
         f"{report['round_trip_ms']['p50']} / {report['round_trip_ms']['p99']}"),
    ]
    for row in report["ef_sweep"]:
        rows.append((f"ef_search {row['ef_search']}: recall@1, p50 / p99 ms",
                     f"{row['recall_at_1']}, {row['search_ms_p50']} / {row['search_ms_p99']}"))
    for point in report["exact"]:
        rows.append((f"exact search at {point['templates']}: p50 / p99 ms",
                     f"{point['search_ms_p50']} / {point['search_ms_p99']}"))
    rows.append((f"exact p99 passes {exact['target_ms']:g} ms at (templates)",
                 f"{exact['estimated_templates']} ({exact['estimate']})" if exact["estimated_templates"]
                 else f"over at {exact['first_size_over']}" if exact["first_size_over"] else "-"))
    if report["index"]["notices"]:
        rows.append(("build notices", " | ".join(report["index"]["notices"])))
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value))
    return table


def run(args, refused: list[str]) -> int:
    """``ident bench --kind gallery``; ``refused`` names the options given that apply to other kinds only."""
    from rich.console import Console

    from ident.fleet import stopped_by_signals

    if refused:
        raise IdentError(f"--kind gallery does not take {', '.join(refused)}: see the --kind gallery options")
    plan = plan_from(args)
    errors = Console(stderr=True)
    with stopped_by_signals():
        try:
            report = bench(plan, errors.print)
        except KeyboardInterrupt:
            errors.print("ident bench --kind gallery interrupted")
            return 130
    Console().print(render(report))
    if args.json_path:
        args.json_path.write_text(json.dumps(report, indent=2))
    return 0
