"""Which onnxruntime-gpu build runs on which NVIDIA card, and which one to install.

A card runs a build only if the build's CUDA provider carries machine code
(SASS) for the card's architecture, or PTX the driver can compile for it; the
CUDA version a build names says nothing about that. ``models/cuda_builds.json``
lists what each published wheel really carries, read from the wheels with
``cuobjdump`` by ``scripts/cuda_builds.py``. This module reads that table,
answers "does build B have code for sm_XY?", and picks the install line for a
host from ``nvidia-smi``: ``scripts/setup.sh`` and ``ident doctor`` ask it,
and so does the worker's fallback reason.

It imports only the standard library: ``scripts/setup.sh`` runs it with the
system Python before any virtual environment exists::

    python3 -m models.cuda_builds choose [--cuda 13|12|none] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
TABLE = Path(__file__).resolve().parent / "cuda_builds.json"

SMI_QUERY_FIELDS = "name,compute_cap,driver_version,pci.bus_id,memory.total"
SMI_TIMEOUT_S = 20

# Oldest Linux driver branch that runs each CUDA major (CUDA's minor-version
# compatibility lets any 12.x build run on 525 and later).
MIN_DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}
# cuDNN 9.11 dropped Maxwell, Pascal and Volta: on those cards the CUDA 12
# lines hold nvidia-cudnn-cu12 below it (their constraints files pin 9.10).
CUDNN_LAST_FOR_PRE_TURING = "9.10"
TURING = (7, 5)


@dataclass(frozen=True)
class Build:
    """One onnxruntime-gpu wheel, as scripts/cuda_builds.py read it."""

    version: str
    cuda_version: str
    sass: tuple[str, ...]
    ptx: tuple[str, ...]

    @property
    def cuda_major(self) -> int:
        return int(self.cuda_version.split(".")[0])

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """SASS for sm_Xy runs on X.z for z >= y; PTX for sm_XY is compiled by the driver for any later card."""
        major, minor = cc
        for arch in self.sass:
            m, n = arch_cc(arch)
            if m == major and n <= minor:
                return True
        return any(arch_cc(arch) <= cc for arch in self.ptx)

    def code_listing(self) -> str:
        sass = ", ".join(self.sass) or "none"
        ptx = ", ".join(self.ptx) or "none"
        return f"SASS {sass}; PTX {ptx}"


def arch_cc(arch: str) -> tuple[int, int]:
    """'sm_61' -> (6, 1); 'sm_120' -> (12, 0)."""
    digits = re.fullmatch(r"(?:sm|compute)_(\d+)[a-z]?", arch)
    if not digits:
        raise ValueError(f"not an architecture name: {arch!r}")
    number = int(digits.group(1))
    return number // 10, number % 10


def sm(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


def architecture(cc: tuple[int, int]) -> str:
    major, minor = cc
    if major == 7:
        return "Turing" if minor >= 5 else "Volta"
    if major == 8:
        return "Ada" if minor >= 9 else "Ampere"
    return {3: "Kepler", 5: "Maxwell", 6: "Pascal", 9: "Hopper", 10: "Blackwell", 12: "Blackwell"}.get(major, "unknown")


def parse_compute_cap(text: str) -> tuple[int, int] | None:
    match = re.match(r"^\s*(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


@lru_cache(maxsize=4)
def load_builds(path: Path = TABLE) -> dict[str, Build]:
    data = json.loads(path.read_text())
    return {
        row["version"]: Build(row["version"], row["cuda_version"], tuple(row["sass"]), tuple(row["ptx"]))
        for row in data["builds"]
    }


def build(version: str | None) -> Build | None:
    """The table's entry for an onnxruntime-gpu version, or None when the table does not list it."""
    return load_builds().get(version or "")


def no_code_reason(version: str | None, cc: tuple[int, int]) -> str | None:
    """Why onnxruntime-gpu ``version`` cannot run on a ``cc`` card, or None when it can (or is not in the table)."""
    found = build(version)
    if found is None or found.runs_on(cc):
        return None
    fix = choose_for(cc, branch=None).advice()
    return (
        f"this onnxruntime-gpu {version} build (CUDA {found.cuda_version}) has no kernels for {sm(cc)} "
        f"({architecture(cc)}, compute {cc[0]}.{cc[1]}): its CUDA provider carries {found.code_listing()}; {fix}"
    )


# --- install lines ----------------------------------------------------------------


@lru_cache(maxsize=None)
def _pins(constraints: str) -> tuple[tuple[str, str], ...]:
    """Read once: a choice asks each line for its pins several times."""
    pins = []
    for raw in (ROOT / constraints).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins.append((name.strip().lower(), version.strip()))
    return tuple(pins)


@dataclass(frozen=True)
class Line:
    """A set of pinned packages that scripts/setup.sh can install, and for which cards."""

    name: str
    constraints: str
    cuda: bool = True
    ort_extras: str = "[cuda,cudnn]"

    def pins(self) -> dict[str, str]:
        """name -> version of every ``name==version`` line in the constraints file."""
        return dict(_pins(self.constraints))

    @property
    def ort_version(self) -> str:
        return self.pins()["onnxruntime-gpu"]

    def build(self) -> Build | None:
        return build(self.ort_version)

    def packages(self) -> list[str]:
        """The pip requirements that pick this line: onnxruntime-gpu and, for CUDA, the pinned NVIDIA libraries."""
        pins = self.pins()
        extras = self.ort_extras if self.cuda else ""
        packages = [f"onnxruntime-gpu{extras}=={pins['onnxruntime-gpu']}"]
        if self.cuda:
            packages += [f"{name}=={version}" for name, version in sorted(pins.items()) if name.startswith("nvidia-")]
        return packages

    def command(self) -> str:
        words = [".venv/bin/python", "-m", "pip", "install", "-c", self.constraints, "-e", ".[dev]", *self.packages()]
        return " ".join(shlex.quote(word) for word in words)


LINES = {
    "cuda13": Line("cuda13", "constraints.txt"),
    "cuda12": Line("cuda12", "constraints-cuda12.txt"),
    # The newest build that still carries code for Maxwell 5.2/5.3; it predates
    # the [cuda,cudnn] extras, so its constraints pin the NVIDIA libraries.
    "cuda12-sm52": Line("cuda12-sm52", "constraints-cuda12-sm52.txt", ort_extras=""),
    # onnxruntime-gpu runs on the CPU too: the same wheel, without the CUDA libraries.
    "cpu": Line("cpu", "constraints.txt", cuda=False),
}
# Preferred first: the newest CUDA that has code for the card.
CUDA_LINES = ("cuda13", "cuda12", "cuda12-sm52")
OVERRIDES = {"13": ("cuda13",), "12": ("cuda12", "cuda12-sm52"), "none": ()}


@dataclass(frozen=True)
class Choice:
    """What scripts/setup.sh installs, and why: its ``--dry-run --json`` line."""

    line: str
    packages: list[str]
    command: str
    reason: str
    constraints: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def advice(self) -> str:
        """The doctor's and the fallback's fix: the set-up command and what it pins."""
        if self.line == "cpu":
            return f"no onnxruntime-gpu line runs CUDA here ({self.reason}): set IDENT_DEVICE=cpu"
        flag = self.line.split("-")[0].removeprefix("cuda")
        return f"`scripts/setup.sh --cuda {flag}` installs one that does ({self.command}): {self.reason}"


def _choice(line: Line, reason: str) -> Choice:
    return Choice(line.name, line.packages(), line.command(), reason, line.constraints)


def driver_branch(driver_version: str | None) -> int | None:
    match = re.match(r"^\s*(\d+)", driver_version or "")
    return int(match.group(1)) if match else None


def choose_for(cc: tuple[int, int], branch: int | None, override: str | None = None,
               card: str | None = None) -> Choice:
    """The line for a card of compute capability ``cc`` on a driver of branch ``branch``.

    ``override`` is setup.sh's ``--cuda 13|12|none``; without it, the newest
    CUDA line with code for the card whose driver minimum is met.
    """
    label = f"{card or 'the GPU'} is {sm(cc)} ({architecture(cc)}, compute {cc[0]}.{cc[1]})"
    if override == "none":
        return _choice(LINES["cpu"], f"--cuda none was asked for; {label}")
    names = OVERRIDES[override] if override else CUDA_LINES
    candidates = [LINES[name] for name in names]
    with_code = [line for line in candidates if line.build() and line.build().runs_on(cc)]
    if not with_code:
        if override:
            # Asked for by name: install it, and say it will not run CUDA on this card.
            line = candidates[0]
            return _choice(line, f"--cuda {override} was asked for, but onnxruntime-gpu {line.ort_version} has no "
                                 f"code for it ({line.build().code_listing()}); {label}: the worker will run on CPU")
        oldest = min((b for b in load_builds().values()), key=lambda b: min(arch_cc(a) for a in b.sass + b.ptx))
        return _choice(LINES["cpu"], f"{label}, and no published onnxruntime-gpu wheel carries code for it (the "
                                     f"oldest architecture any carries is {min(oldest.sass + oldest.ptx, key=arch_cc)}, "
                                     f"in {oldest.version}): the workers run on CPU; set IDENT_DEVICE=cpu")
    for line in with_code:
        found = line.build()
        minimum = MIN_DRIVER_BRANCH[found.cuda_major]
        if branch is not None and branch < minimum and not override:
            continue
        reason = f"{label}; onnxruntime-gpu {found.version} (CUDA {found.cuda_version}) carries {found.code_listing()}"
        if cc < TURING:
            reason += f"; cuDNN 9.11 dropped {architecture(cc)}, so nvidia-cudnn-cu12 stays at {CUDNN_LAST_FOR_PRE_TURING}"
        if branch is not None and branch < minimum:
            reason += f"; the driver (branch {branch}) is older than CUDA {found.cuda_major}'s {minimum}: upgrade it"
        elif override is None and line is not with_code[0]:
            newer = with_code[0].build()
            reason += (f"; the driver (branch {branch}) is older than the {MIN_DRIVER_BRANCH[newer.cuda_major]}+ "
                       f"that CUDA {newer.cuda_major} (onnxruntime-gpu {newer.version}) needs")
        return _choice(line, reason)
    needed = MIN_DRIVER_BRANCH[with_code[-1].build().cuda_major]
    return _choice(LINES["cpu"], f"{label}, but the driver (branch {branch}) is older than the {needed} "
                                 f"any onnxruntime-gpu line with code for it needs: upgrade the NVIDIA driver, then "
                                 "run scripts/setup.sh again")


def parse_smi_query(text: str) -> list[dict]:
    """``nvidia-smi --query-gpu=name,compute_cap,driver_version,pci.bus_id,memory.total
    --format=csv,noheader`` -> one dict per GPU, in nvidia-smi's (PCI bus) order."""
    gpus = []
    for line in text.splitlines():
        # GPU names contain no commas, so a plain split is exact.
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            continue
        name, compute_cap, driver, bus_id, memory = parts
        gpus.append({"index": len(gpus), "name": name, "compute_cap": compute_cap, "driver_version": driver,
                     "pci_bus_id": bus_id, "memory_total": memory})
    return gpus


def query_gpus() -> tuple[list[dict], str | None]:
    """The host's GPUs from nvidia-smi, or why there are none to read."""
    path = shutil.which("nvidia-smi")
    if path is None:
        return [], "no nvidia-smi on PATH, so no NVIDIA driver is installed here"
    try:
        done = subprocess.run([path, f"--query-gpu={SMI_QUERY_FIELDS}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi did not answer ({exc})"
    gpus = parse_smi_query(done.stdout) if done.returncode == 0 else []
    if not gpus:
        said = (done.stdout or done.stderr).strip().splitlines()
        return [], f"nvidia-smi found no GPU (exit {done.returncode}: {said[0] if said else 'no output'})"
    return gpus, None


def choose(gpus: Sequence[Mapping], problem: str | None = None, override: str | None = None) -> Choice:
    """The line for this host's GPUs: the one with the oldest architecture decides, as every worker must run on it."""
    readable = [(parse_compute_cap(g["compute_cap"]), g) for g in gpus]
    readable = [(cc, g) for cc, g in readable if cc is not None]
    if not readable:
        why = problem or "nvidia-smi reported no compute capability"
        if override in (None, "none"):
            return _choice(LINES["cpu"], f"{why}: the workers run on CPU")
        line = LINES[OVERRIDES[override][0]]
        return _choice(line, f"--cuda {override} was asked for; {why}, so it cannot be checked against a card")
    cc, gpu = min(readable, key=lambda pair: pair[0])
    choice = choose_for(cc, driver_branch(gpu["driver_version"]), override,
                        card=f"GPU {gpu['index']} {gpu['name']} (driver {gpu['driver_version']}, {gpu['memory_total']})")
    if len(readable) > 1:
        choice = replace(choice, reason=choice.reason + f"; chosen for the oldest of {len(readable)} GPUs")
    return choice


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m models.cuda_builds",
                                     description="Pick the onnxruntime-gpu line for this host's NVIDIA GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    pick = sub.add_parser("choose", help="print the line scripts/setup.sh installs here")
    pick.add_argument("--cuda", choices=sorted(OVERRIDES), help="override the choice: 13, 12 or none (CPU)")
    pick.add_argument("--json", action="store_true", help="print one JSON object")
    named = sub.add_parser("line", help="print a line by name (the Dockerfile's CUDA_LINE build argument)")
    named.add_argument("name", choices=sorted(LINES))
    named.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.command == "line":
        choice = _choice(LINES[args.name], f"{args.name} was named (no GPU is read)")
    else:
        gpus, problem = query_gpus()
        choice = choose(gpus, problem, args.cuda)
    if args.json:
        print(choice.to_json())
    else:
        print(f"line: {choice.line}\nreason: {choice.reason}\npackages: {' '.join(choice.packages)}\n"
              f"command: {choice.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
