"""The embedded PostgreSQL with pgvector: one server per host, under IDENT_DATA_DIR, started on demand.

``pgserver`` ships PostgreSQL 16 with pgvector 0.6 as a wheel and starts it on
a Unix socket only (no TCP port to open or guard). Every worker process on the
host that asks for it joins the same server: pgserver serialises the start
under an inter-process lock and finds a running server by its postmaster.pid.
The server outlives the processes that started it, as a system service would;
``ident gallery stop-embedded`` (and the tests) stop it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from pathlib import Path

from tasks.errors import GalleryUnavailable

log = logging.getLogger(__name__)

# What the postmaster writes to its log when a backend dies of an illegal instruction.
SIGILL_MARKERS = ("terminated by signal 4", "Illegal instruction")


def cluster_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "postgres"


def start(data_dir: Path) -> str:
    """The connection URL of the host's embedded server, started if it is not running."""
    pgdata = cluster_dir(data_dir)
    try:
        pgdata.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and
            # falls back to /tmp, which is where pgserver's lock then lives: fine.
            warnings.simplefilter("ignore", category=Warning)
            import pgserver

            server = pgserver.get_server(pgdata, cleanup_mode=None)
            if not server.get_postmaster_info().is_running():
                # get_server keeps one handle per folder per process and never looks again, so
                # after the server stopped (stop-embedded, a crash) it would hand back the dead
                # server's socket forever. A new handle (the class's public constructor, which
                # replaces the cached one) starts the server anew.
                server = pgserver.PostgresServer(pgdata, cleanup_mode=None)
        return server.get_uri()
    except ImportError as exc:
        raise GalleryUnavailable(
            f"the embedded PostgreSQL needs the pgserver package ({exc}): install the worker extras "
            "(pip install 'identification[worker]'), or point IDENT_GALLERY_URL at a PostgreSQL server with pgvector"
        ) from None
    except Exception as exc:  # pgserver raises CalledProcessError, TimeoutExpired, OSError, AssertionError
        raise GalleryUnavailable(
            f"the embedded PostgreSQL under {pgdata} did not start ({type(exc).__name__}: {exc}); its log is "
            f"{pgdata / 'log'}. Free the disk or fix the folder's permissions (IDENT_DATA_DIR), or point "
            "IDENT_GALLERY_URL at a PostgreSQL server with pgvector"
        ) from exc


def stop(data_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop the host's embedded server (PostgreSQL's fast shutdown, SIGINT); False when none was running.

    A postmaster that has not gone after ``timeout_s`` gets an immediate shutdown
    (SIGQUIT; the next start recovers from the WAL): PostgreSQL 16.2 never finishes a
    fast shutdown asked for while it recovers from a crashed backend (a SIGILL, say).
    """
    pid = running_pid(data_dir)
    if pid is None:
        return False
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGQUIT, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return sig != signal.SIGINT  # gone before we asked: it was not ours to stop
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        if sig == signal.SIGINT:
            log.warning("the embedded PostgreSQL (pid %d) did not stop within %g s of a fast shutdown: "
                        "shutting it down immediately", pid, timeout_s)
    raise GalleryUnavailable(f"the embedded PostgreSQL (pid {pid}) did not stop within {timeout_s:g} s, nor "
                             f"10 s after an immediate shutdown: stop it with kill -9 {pid}")


def running_pid(data_dir: Path) -> int | None:
    """The embedded server's postmaster pid, from its postmaster.pid, if that process lives."""
    try:
        pid = int((cluster_dir(data_dir) / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def crashed_on_illegal_instruction(data_dir: Path, wait_s: float = 0.0) -> bool:
    """Whether the embedded server's log shows a backend killed by SIGILL, waiting up to ``wait_s`` for it.

    The client sees its connection drop the moment the backend dies; the
    postmaster writes the line only once it has reaped the backend (tens of
    milliseconds later), so a caller that just lost its connection waits.
    """
    deadline = time.monotonic() + wait_s
    while not _log_shows_sigill(data_dir):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _log_shows_sigill(data_dir: Path) -> bool:
    path = cluster_dir(data_dir) / "log"
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 65536))
            tail = handle.read().decode("utf-8", "replace")
    except OSError:
        return False
    return any(marker in tail for marker in SIGILL_MARKERS)
