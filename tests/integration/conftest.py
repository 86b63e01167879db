"""A real fleet for integration tests: redis-server and celery worker processes.

The fleet is started the way an operator starts it (``celery -A workers.<kind>
worker -Q <kind>``), with the real models from ../shared/models.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ident.fleet import EmbeddedRedis, start_worker, wait_until_ready
from tasks.client import IdentClient
from tasks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="session")
def redis_server():
    server = EmbeddedRedis().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def gallery_data_dir(tmp_path_factory):
    """IDENT_DATA_DIR of the session's fleet: its embedded PostgreSQL starts there on the first gallery job."""
    from galleries import embedded

    path = tmp_path_factory.mktemp("ident-data")
    yield path
    embedded.stop(path)


@pytest.fixture(scope="session")
def fleet_env(redis_server, models_path, gallery_data_dir) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDENT_")}
    env.update(
        IDENT_REDIS_URL=redis_server.url,
        IDENT_MODELS_DIR=str(models_path),
        IDENT_DATA_DIR=str(gallery_data_dir),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def client(fleet_env) -> IdentClient:
    return IdentClient(Settings.from_env(fleet_env))


@pytest.fixture(scope="session")
def fleet(fleet_env, client, logs_dir):
    """One vision worker with two pool processes and one audio worker with one."""
    workers = [
        start_worker("vision", fleet_env, concurrency=2, name="vision-a@itest", log_dir=logs_dir),
        start_worker("audio", fleet_env, concurrency=1, name="audio-a@itest", log_dir=logs_dir),
    ]
    try:
        wait_until_ready(client.app, workers, timeout=180)
        yield {w.kind: w for w in workers}
    finally:
        for worker in workers:
            worker.stop()
