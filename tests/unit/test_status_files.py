"""Each worker's status folder: its own, and fresh when it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from workers import bootstrap


def test_a_worker_restarted_with_the_same_name_and_pid_starts_from_an_empty_folder(tmp_path, monkeypatch):
    """A restarted container is pid 1 again, with the same worker name and /tmp: the failed
    status its last run left must not make this run's clean shutdown exit 1."""
    monkeypatch.setattr(bootstrap, "STATUS_ROOT", tmp_path)
    monkeypatch.setattr(bootstrap._identity, "hostname", "vision@container")
    monkeypatch.setattr(bootstrap._identity, "main_pid", 1)
    bootstrap.fresh_status_dir()
    (bootstrap.status_dir() / "6.json").write_text(json.dumps({"pid": 6, "state": bootstrap.FAILED}))
    bootstrap.fresh_status_dir()
    assert list(bootstrap.status_dir().iterdir()) == []


def test_only_dead_workers_folders_of_the_same_name_are_cleared(tmp_path, monkeypatch):
    monkeypatch.setattr(bootstrap, "STATUS_ROOT", tmp_path)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(exited.stdout), os.getpid()
    for name, pid in (("vision@local", dead), ("vision@local", alive), ("audio@local", dead)):
        (tmp_path / f"{name}.{pid}").mkdir()
    bootstrap.clear_dead_status_dirs("vision@local")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"audio@local.{dead}", f"vision@local.{alive}"]
