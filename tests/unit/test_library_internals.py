"""Celery's, kombu's and billiard's internals: touched in two modules, present in the installed versions.

workers/celery_internals.py and workers/kombu_internals.py subclass or patch
what those libraries document only in their sources. An upgrade that renames
or moves one of those names fails here, loudly, before a worker misbehaves;
the versions they were checked against are pinned here and in constraints.txt.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("tasks", "models", "workers", "galleries", "ident")
INTERNALS_MODULES = {"workers/celery_internals.py", "workers/kombu_internals.py"}
# What the project may import from these libraries anywhere: their documented API.
PUBLIC = {
    "celery", "celery.signals", "celery.exceptions", "celery.result", "celery.platforms", "celery.utils.log",
    "celery.worker.control",  # inspect_command: the documented way to add a remote-control command
    "kombu", "kombu.exceptions", "billiard.exceptions",
    "celery.utils.saferepr",  # in the API reference: the repr Celery itself logs with
}
SUPPORTED = {"celery": "5.7.", "kombu": "5.7.", "billiard": "4.3."}


def project_modules():
    for package in PROJECT_PACKAGES:
        yield from sorted((REPO / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("library, prefix", sorted(SUPPORTED.items()))
def test_the_library_versions_the_internals_were_written_for(library, prefix):
    version = importlib.metadata.version(library)
    assert version.startswith(prefix), (
        f"{library} {version} is installed, but workers/*_internals.py were checked against {prefix}x: "
        "read what they use in the new version, run the whole suite, then widen SUPPORTED"
    )


def test_only_the_internals_modules_reach_past_the_libraries_public_api():
    offenders = {}
    for path in project_modules():
        relative = str(path.relative_to(REPO))
        if relative in INTERNALS_MODULES:
            continue
        private = {name for name in imported_modules(path)
                   if name.split(".")[0] in ("celery", "kombu", "billiard") and not _public(name)}
        if private:
            offenders[relative] = sorted(private)
    assert offenders == {}, "these reach library internals outside workers/*_internals.py"


def _public(name: str) -> bool:
    return name in PUBLIC or any(name.startswith(module + ".") and name.count(".") == module.count(".") + 1
                                 for module in PUBLIC)


def test_no_import_cycles_among_the_projects_modules():
    names = {}
    for path in project_modules():
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {module: {target for target in _project_targets(imported_modules(path), names) if target != module}
             for module, path in names.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or ())


def _project_targets(imported: set[str], modules: dict) -> set[str]:
    """The project modules behind imported names: ``from workers import status`` names ``workers.status``."""
    targets = set()
    for name in imported:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)
    return targets


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_importing_the_contract_changes_nothing_in_kombu_or_celery():
    code = """
import kombu.transport, celery.app.trace as trace, celery.worker.request as request
before = (dict(kombu.transport.TRANSPORT_ALIASES), dict(kombu.transport._transport_cache),
          trace.saferepr, request.saferepr, trace.LOG_SUCCESS)
import tasks, tasks.app, tasks.client, tasks.contract, tasks.errors, tasks.settings
from tasks.app import make_app
make_app("a-producer").connection_for_write().transport
after = (dict(kombu.transport.TRANSPORT_ALIASES), dict(kombu.transport._transport_cache),
         trace.saferepr, request.saferepr, trace.LOG_SUCCESS)
assert before[0] == after[0] and before[2:] == after[2:], "importing tasks changed kombu or Celery"
assert all(not str(v).startswith("workers") for v in after[1].values())
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_every_celery_internal_the_fleet_uses_is_there():
    from celery.app import trace
    from celery.backends.redis import RedisBackend
    from celery.concurrency import asynpool, prefork
    from celery.worker import request, state, strategy

    for name in ("_create_write_handlers", "_create_process_handlers", "_worker_active", "flush",
                 "on_process_down", "_cache"):
        assert hasattr(asynpool.AsynPool, name) or name in inspect.getsource(asynpool.AsynPool), name
    # The pool's private set of busy processes, made in AsynPool.__init__.
    assert "self._busy_workers = set()" in inspect.getsource(asynpool.AsynPool.__init__)
    assert "self._mark_worker_as_available" in inspect.getsource(asynpool.AsynPool)
    assert hasattr(prefork.TaskPool, "Pool") and hasattr(prefork.TaskPool, "uses_semaphore")
    assert "_request_dict" in inspect.getsource(request.Request.__init__)
    assert hasattr(request.Request, "on_timeout") and hasattr(request, "create_request_cls")
    assert hasattr(request, "saferepr") and hasattr(trace, "saferepr")
    for name in ("task_reserved", "task_accepted", "task_ready"):
        assert callable(getattr(state, name)), name
    # The jobs a worker holds, and its pool's processes, as the metrics read them.
    assert isinstance(state.requests, dict)
    assert "self._pool" in inspect.getsource(prefork.TaskPool.on_start)
    from billiard.pool import Pool as BilliardPool
    assert "self._pool = []" in inspect.getsource(BilliardPool.__init__)
    assert "self._processes = " in inspect.getsource(BilliardPool.__init__)
    assert "self._processes += 1" in inspect.getsource(BilliardPool.grow)
    assert callable(strategy.default)
    for name in ("_store_result", "_get_result_meta", "get_key_for_task", "ensure", "encode", "_MAX_STR_VALUE_SIZE"):
        assert hasattr(RedisBackend, name), name
    from celery.backends.redis import SentinelBackend
    assert issubclass(SentinelBackend, RedisBackend) and "master_for" in inspect.getsource(SentinelBackend._get_pool)


def test_every_kombu_internal_the_fleet_uses_is_there():
    import kombu.transport
    from kombu.transport import redis

    assert isinstance(kombu.transport.TRANSPORT_ALIASES, dict) and isinstance(kombu.transport._transport_cache, dict)
    for name in ("conn_or_acquire", "_create_client", "_brpop_start", "_brpop_read", "_flush_brpop_reauth",
                 "active_queues", "priority_steps", "unacked_key", "sep", "_queue_cycle"):
        assert name in inspect.getsource(redis.Channel), name
    for name in ("append", "restore_visible", "pipe_or_acquire", "unacked_index_key", "unacked_key"):
        assert hasattr(redis.QoS, name), name
    assert "_vrestore_count" in inspect.getsource(redis.QoS)
    assert redis.PRIORITY_STEPS
    # How kombu names a priority sub-list, which ident_queue_length counts (queued_job_lists).
    assert 'return f"{queue}{self.sep}{pri}"' in inspect.getsource(redis.Channel._q_for_pri)
    assert isinstance(redis.Channel.sep, str) and isinstance(redis.Channel.unacked_key, str)
    # The Sentinel channel and transport that kombu_internals.SentinelChannel/SentinelTransport extend.
    assert issubclass(redis.SentinelChannel, redis.Channel) and issubclass(redis.SentinelTransport, redis.Transport)
    assert "_sentinel_managed_pool" in inspect.getsource(redis.SentinelChannel._get_pool)


def test_prometheus_clients_multiprocess_switch_is_where_workers_metrics_reaches_it():
    """workers/metrics.py turns multiprocess mode on after prometheus-client was imported.

    prometheus-client reads PROMETHEUS_MULTIPROC_DIR once, at import, into
    ``values.ValueClass``; the worker can only name its folder later, so
    ``metrics.enable`` replaces that class. A release that moves it breaks the
    pool's sums silently: fail here instead.
    """
    from prometheus_client import values

    assert importlib.metadata.version("prometheus-client").startswith("0."), "read workers/metrics.py's enable()"
    assert hasattr(values, "ValueClass") and callable(values.MultiProcessValue)
    made = values.MultiProcessValue()
    assert getattr(made, "_multiprocess", False) is True
