"""The gallery database going away and coming back, a pgvector that dies of SIGILL, a server never there.

Each test that stops or crashes a server runs its own in a data dir of its own:
the session's shared server stays up for the other tests.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from galleries import embedded
from galleries.database import CONNECT_TIMEOUT_S, Database
from galleries.store import GalleryStore
from tasks.errors import GalleryUnavailable

from .conftest import FACE, near, unit_vectors


@pytest.fixture
def own_server(new_data_dir):
    """A data dir for an embedded server of the test's own (stopped at the end, whatever the test did to it)."""
    return new_data_dir()


def test_the_same_store_works_again_when_the_database_comes_back(own_server, rng):
    url = embedded.start(own_server)
    database = Database(url, own_server)  # as IDENT_GALLERY_URL: the worker does not manage this server
    store = GalleryStore(database)
    alice = unit_vectors(rng, 1)[0]
    store.enroll("door", "alice", alice, FACE, "src")
    assert store.identify("door", [alice], FACE)[1][0][0].subject_id == "alice"
    assert database.connected and database.problem is None

    assert embedded.stop(own_server) is True
    assert embedded.running_pid(own_server) is None
    started = time.monotonic()
    with pytest.raises(GalleryUnavailable) as gone:
        store.identify("door", [near(alice, rng)], FACE)
    assert time.monotonic() - started < CONNECT_TIMEOUT_S
    message = str(gone.value)
    assert "is unreachable" in message and "nothing was changed" in message
    assert "Check that the server runs and that IDENT_GALLERY_URL names it" in message
    assert database.problem is not None and database.problem.startswith("unreachable")
    assert not database.connected
    with pytest.raises(GalleryUnavailable, match="is unreachable"):
        store.enroll("door", "bob", unit_vectors(rng, 1)[0], FACE, "src")

    # The server comes back (on the same socket); the same Database and store carry on.
    assert embedded.start(own_server) == url
    _, (candidates,) = store.identify("door", [near(alice, rng)], FACE, top_k=5)
    assert [c.subject_id for c in candidates] == ["alice"]  # bob's refused enrolment left nothing
    assert store.database is database and database.connected and database.problem is None
    assert store.enroll("door", "bob", unit_vectors(rng, 1)[0], FACE, "src").added


def test_the_embedded_server_is_started_again_by_the_next_job(own_server, rng):
    database = Database("", own_server)  # no IDENT_GALLERY_URL: the worker's own embedded server
    store = GalleryStore(database)
    alice = unit_vectors(rng, 1)[0]
    store.enroll("door", "alice", alice, FACE, "src")
    first_pid = embedded.running_pid(own_server)
    assert first_pid is not None

    assert embedded.stop(own_server) is True
    # The job finds its connection gone, reconnects once, and that starts the server again.
    _, (candidates,) = store.identify("door", [near(alice, rng)], FACE)
    assert [c.subject_id for c in candidates] == ["alice"]
    assert embedded.running_pid(own_server) not in (None, first_pid)
    assert database.problem is None


def test_a_backend_killed_by_sigill_is_reported_as_a_pgvector_built_for_another_cpu(own_server):
    database = Database("", own_server)
    conn = database.connection()
    log = embedded.cluster_dir(own_server) / "log"
    assert "terminated by signal 4" not in log.read_text()
    assert not embedded.crashed_on_illegal_instruction(own_server)

    os.kill(conn.info.backend_pid, signal.SIGILL)  # what an AVX-512 instruction does on a CPU without it
    with pytest.raises(GalleryUnavailable) as crashed:
        database._check_vector_math(conn)
    message = str(crashed.value)
    assert "died of SIGILL (Illegal instruction)" in message
    assert "pgvector was compiled for CPU instructions this CPU lacks" in message
    assert "Point IDENT_GALLERY_URL at a PostgreSQL server with pgvector built for this CPU" in message
    assert f"the embedded PostgreSQL under {embedded.cluster_dir(own_server)}" in message
    assert "terminated by signal 4: Illegal instruction" in log.read_text()
    assert embedded.crashed_on_illegal_instruction(own_server)

    # A server busy recovering from the crash still stops (PostgreSQL 16.2 ignores the fast
    # shutdown asked for then; stop() follows it with an immediate one).
    assert embedded.stop(own_server, timeout_s=1.5) is True
    assert embedded.running_pid(own_server) is None


def test_an_unreachable_url_fails_quickly_and_keeps_its_password(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = Database(f"postgresql://ident:s3cret@127.0.0.1:{port}/galleries", tmp_path)
    store = GalleryStore(database)
    started = time.monotonic()
    with pytest.raises(GalleryUnavailable) as refused:
        store.galleries()
    assert time.monotonic() - started < CONNECT_TIMEOUT_S
    message = str(refused.value)
    assert f"the gallery database at postgresql://**@127.0.0.1:{port}/galleries is unreachable" in message
    assert "IDENT_GALLERY_URL" in message
    assert "s3cret" not in message and "s3cret" not in database.problem
    assert database.problem.startswith("unreachable")
    assert not database.connected
    # Nothing was started for it.
    assert not embedded.cluster_dir(tmp_path).exists()
