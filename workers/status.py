"""Per-pool-process status files, which the main process reads to answer ``model_status``.

The main process holds no sessions: each pool process writes what it loaded
(providers, reasons, jobs) to a small JSON file after loading and after each
change, and the ``model_status`` control command (workers/wiring.py) reads the
files of the pool's live processes. The folder is the worker's own, by name
and main pid, in the temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import psutil

from tasks.contract import DEVICE_FIELD

STATUS_ROOT = Path(tempfile.gettempdir()) / f"identification-{os.getuid()}"
FAILED = "failed"


class Identity(Protocol):
    kind: str | None
    hostname: str
    main_pid: int


def status_dir(identity: Identity) -> Path:
    """This worker's status files: by name and main process, as two fleets on one host
    (two `ident up`, each with its vision@local) must not read or clear each other's."""
    return STATUS_ROOT / f"{_safe_name(identity.hostname)}.{identity.main_pid}"


def _safe_name(hostname: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", hostname)


def fresh_status_dir(identity: Identity) -> None:
    """An empty status folder for this starting worker, and none left of dead ones of its name."""
    clear_dead_status_dirs(identity.hostname)
    # Anything already under this name and pid is an earlier incarnation's: a
    # restarted container is pid 1 again, with the same name and /tmp.
    shutil.rmtree(status_dir(identity), ignore_errors=True)
    status_dir(identity).mkdir(parents=True)


def clear_dead_status_dirs(hostname: str) -> None:
    """Remove the status folders of earlier workers of this name whose main process is gone."""
    for folder in STATUS_ROOT.glob(f"{_safe_name(hostname)}.*"):
        pid = folder.name.rsplit(".", 1)[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def status_without_models(identity: Identity, pid: int, state: str, message: str) -> dict:
    """The status of a pool process that has no runtime: still loading, or failed to load."""
    return {"hostname": identity.hostname, "pid": pid, "queue": identity.kind, "state": state,
            DEVICE_FIELD: None, "message": message}


def write_status_file(identity: Identity, status: dict) -> None:
    folder = status_dir(identity)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{status['pid']}.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(status))
    os.replace(temporary, target)


def read_status_file(identity: Identity, pid: int) -> dict:
    try:
        return json.loads((status_dir(identity) / f"{pid}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return status_without_models(identity, pid, "starting", "the process has not finished loading its models yet")


def remove_status_file(identity: Identity, pid: int) -> None:
    (status_dir(identity) / f"{pid}.json").unlink(missing_ok=True)


def any_failed(identity: Identity) -> bool:
    """Whether a pool process of this worker failed to load its models."""
    for path in status_dir(identity).glob("*.json"):
        try:
            if json.loads(path.read_text()).get("state") == FAILED:
                return True
        except (OSError, json.JSONDecodeError):
            continue
    return False
