"""Test only: an ``nvidia-smi`` that answers as a given card, for hosts without one.

Only the driver's tool is stood in: ``write(folder, card)`` puts an executable
``nvidia-smi`` in ``folder`` that answers ``--query-gpu=FIELDS --format=csv,noheader``
with the card's values, in the order asked, as the real tool does, and prints
the real tool's header (with its "CUDA Version") when called plainly. Put the
folder first on PATH and the real set-up script, doctor and worker read it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

CARDS = {
    "mx230": {"name": "NVIDIA GeForce MX230", "compute_cap": "6.1", "driver_version": "580.95.05",
              "pci.bus_id": "00000000:02:00.0", "memory.total": "2048 MiB", "cuda": "13.0"},
    "rtx4060": {"name": "NVIDIA GeForce RTX 4060 Laptop GPU", "compute_cap": "8.9", "driver_version": "580.95.05",
                "pci.bus_id": "00000000:01:00.0", "memory.total": "8188 MiB", "cuda": "13.0"},
    "gtx970m": {"name": "NVIDIA GeForce GTX 970M", "compute_cap": "5.2", "driver_version": "580.95.05",
                "pci.bus_id": "00000000:01:00.0", "memory.total": "3072 MiB", "cuda": "13.0"},
    "gtx950m": {"name": "NVIDIA GeForce GTX 950M", "compute_cap": "5.0", "driver_version": "580.95.05",
                "pci.bus_id": "00000000:01:00.0", "memory.total": "4096 MiB", "cuda": "13.0"},
}

_PROGRAM = '''#!{python}
import json, sys
card = json.loads({card!r})
query = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")), None)
if query is not None:
    fields = [f.strip() for f in query.split(",")]
    unknown = [f for f in fields if f not in card]
    if unknown:
        print(f'Field "{{unknown[0]}}" is not a valid field to query.', file=sys.stderr)
        sys.exit(2)
    print(", ".join(card[f] for f in fields))
else:
    print("+-----------------------------------------------------------------------------------------+")
    print(f"| NVIDIA-SMI {{card['driver_version']}}              Driver Version: {{card['driver_version']}}      CUDA Version: {{card['cuda']}}     |")
    print("+-----------------------------------------------------------------------------------------+")
    print(f"|   0  {{card['name']}}    Off |   {{card['pci.bus_id']}} Off |                  N/A |")
'''


def write(folder: Path, card: str) -> Path:
    """An executable nvidia-smi for ``card`` (a key of CARDS) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nvidia-smi"
    path.write_text(_PROGRAM.format(python=sys.executable, card=json.dumps(CARDS[card])))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def environment(folder: Path, card: str, base: dict | None = None) -> dict[str, str]:
    """This process's environment with the stand-in for ``card`` first on PATH."""
    write(folder, card)
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    return env
