"""A real PostgreSQL with pgvector for the gallery tests: pgserver's, in a pytest tmp folder.

One server for the whole session (initdb takes seconds); each test takes its
own gallery names from ``names`` so that tests share the server and nothing
else. Embeddings are synthetic unit vectors from a seeded generator.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql as pgsql
from pgvector.psycopg import register_vector

from galleries import embedded
from galleries.database import Database
from galleries.store import EmbeddingModel, GalleryStore

DIMENSIONS = 128


def model(key: str, modality: str, dimensions: int = DIMENSIONS, version: str = "v1") -> EmbeddingModel:
    """A model as the catalog describes one: its key, its file's sha256, its output size, its modality."""
    return EmbeddingModel(key, hashlib.sha256(f"{key}-{version}".encode()).hexdigest(), dimensions, modality)


FACE = model("test-face", "vision")
FACE_RETRAINED = model("test-face", "vision", version="v2")  # same key, another file
VOICE = model("test-voice", "audio", dimensions=64)


def unit_vectors(rng: np.random.Generator, count: int, dimensions: int = DIMENSIONS) -> np.ndarray:
    """``count`` random unit vectors (float32), one a row."""
    vectors = rng.standard_normal((count, dimensions))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def near(vector: np.ndarray, rng: np.random.Generator, noise: float = 0.02) -> np.ndarray:
    """A unit vector close to ``vector``: another capture of the same subject."""
    moved = vector.astype(np.float64) + noise * rng.standard_normal(vector.shape[0])
    return (moved / np.linalg.norm(moved)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def url_for_database(url: str, dbname: str) -> str:
    """The server's socket URL (postgresql://postgres:@/postgres?host=...) naming another database."""
    changed, count = re.subn(r"^(postgresql://[^/]*/)[^?]*", rf"\g<1>{dbname}", url)
    assert count == 1, url
    return changed


@dataclass(frozen=True)
class Server:
    data_dir: Path
    url: str


# Left out of a cluster's copy: what belongs to the server that ran in the template.
_NOT_COPIED = ("log", "postmaster.pid", "postmaster.opts", ".handle_pids.json", ".s.PGSQL.*")


def _copy_cluster(source: Path, target: Path) -> None:
    """A copy of a stopped cluster, owned as the original is (pgserver's own user when run as root)."""
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    owner = source.stat()
    if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
        for folder, subfolders, files in os.walk(target):
            for name in [folder, *(os.path.join(folder, entry) for entry in subfolders + files)]:
                os.chown(name, owner.st_uid, owner.st_gid, follow_symlinks=False)


@pytest.fixture(scope="session")
def new_data_dir(tmp_path_factory):
    """``new_data_dir()``: a data dir holding an initialised cluster, its server not started yet.

    initdb takes seconds on a busy machine; it runs once, and every data dir
    gets a copy of that cluster. Each server started in one is stopped at the end.
    """
    template = tmp_path_factory.mktemp("cluster-template")
    embedded.start(template)
    embedded.stop(template)
    made = []

    def make() -> Path:
        data_dir = tmp_path_factory.mktemp("gallery-data")
        _copy_cluster(embedded.cluster_dir(template), embedded.cluster_dir(data_dir))
        made.append(data_dir)
        return data_dir

    yield make
    with ThreadPoolExecutor(max(1, len(made))) as stopping:  # each shutdown mostly waits on its checkpoint
        list(stopping.map(lambda data_dir: embedded.stop(data_dir, timeout_s=5), made))


@pytest.fixture(scope="session")
def gallery_server(new_data_dir) -> Server:
    """The session's shared server: every test's galleries live here, each under names of its own."""
    data_dir = new_data_dir()
    return Server(data_dir, embedded.start(data_dir))


@pytest.fixture(scope="session")
def database(gallery_server: Server) -> Database:
    """One process's Database on the session's server, given its socket URL as IDENT_GALLERY_URL would."""
    db = Database(gallery_server.url, gallery_server.data_dir)
    yield db
    db.close()


@pytest.fixture
def store(database: Database) -> GalleryStore:
    return GalleryStore(database)


@pytest.fixture
def make_store(database: Database):
    """A GalleryStore over the session's database with other settings (index_min_templates, ef_search)."""
    return lambda **settings: GalleryStore(database, **settings)


@pytest.fixture(scope="session")
def direct(gallery_server: Server, database: Database) -> psycopg.Connection:
    """A connection of its own, for looking at tables behind the store's back."""
    database.connection()  # creates the vector extension and the schema, which register_vector needs
    conn = psycopg.connect(gallery_server.url, autocommit=True)
    register_vector(conn)
    yield conn
    conn.close()


_serial = itertools.count(1)


@pytest.fixture
def names(request):
    """``names("x")`` gives a gallery name that no other test of the session uses."""
    test = re.sub(r"[^A-Za-z0-9_]+", "-", request.node.name)[:60]

    def name(label: str = "g") -> str:
        return f"{test}-{label}-{next(_serial)}"

    return name


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded by the test's name: each test its own vectors, the same on every run."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:8], "big"))


def table_of(conn: psycopg.Connection, gallery_name: str) -> str:
    (gallery_id,) = conn.execute("SELECT id FROM ident_galleries WHERE name = %s", (gallery_name,)).fetchone()
    return f"ident_templates_{gallery_id}"


def rows_in(conn: psycopg.Connection, gallery_name: str, subject_id: str | None = None) -> int:
    table = pgsql.Identifier(table_of(conn, gallery_name))
    if subject_id is None:
        query = pgsql.SQL("SELECT count(*) FROM {}").format(table)
        return conn.execute(query).fetchone()[0]
    query = pgsql.SQL("SELECT count(*) FROM {} WHERE subject_id = %s").format(table)
    return conn.execute(query, (subject_id,)).fetchone()[0]
