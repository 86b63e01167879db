"""Each worker's status folder: its own, and fresh when it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from workers import status
from workers.runtime import WorkerIdentity


def test_a_worker_restarted_with_the_same_name_and_pid_starts_from_an_empty_folder(tmp_path, monkeypatch):
    """A restarted container is pid 1 again, with the same worker name and /tmp: the failed
    status its last run left must not make this run's clean shutdown exit 1."""
    monkeypatch.setattr(status, "STATUS_ROOT", tmp_path)
    identity = WorkerIdentity(kind="vision", hostname="vision@container", main_pid=1)
    status.fresh_status_dir(identity)
    (status.status_dir(identity) / "6.json").write_text(json.dumps({"pid": 6, "state": status.FAILED}))
    status.fresh_status_dir(identity)
    assert list(status.status_dir(identity).iterdir()) == []


def test_only_dead_workers_folders_of_the_same_name_are_cleared(tmp_path, monkeypatch):
    monkeypatch.setattr(status, "STATUS_ROOT", tmp_path)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(exited.stdout), os.getpid()
    for name, pid in (("vision@local", dead), ("vision@local", alive), ("audio@local", dead)):
        (tmp_path / f"{name}.{pid}").mkdir()
    status.clear_dead_status_dirs("vision@local")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"audio@local.{dead}", f"vision@local.{alive}"]
