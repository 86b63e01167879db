"""Read what each published onnxruntime-gpu wheel really carries, into models/cuda_builds.json.

A card runs an onnxruntime-gpu build only if the build's CUDA provider holds
machine code (SASS) for the card's architecture, or PTX that the driver can
compile for it. This script reads that from the wheels themselves, for each
``--versions`` entry:

1. downloads the Linux x86_64 wheel for ``--python-tag`` from PyPI with
   ``pip download --no-deps --only-binary=:all:`` and notes its file name and
   sha256;
2. reads ``onnxruntime/capi/build_and_package_info.py`` in the wheel for
   ``cuda_version`` (and ``cudnn_version`` when it is there). The 1.18 to 1.20
   wheels do not ship that file: their ``cuda_version`` is then the CUDA
   toolkit that compiled their kernels, read from the ELF header of the cubins
   that cuobjdump extracts (its ``e_version`` field, which cuobjdump prints as
   ``toolkit=122`` for 12.2), and their ``cudnn_version`` is null;
3. extracts ``onnxruntime/capi/libonnxruntime_providers_cuda.so`` and lists its
   SASS and PTX architectures with NVIDIA's ``cuobjdump --list-elf`` and
   ``--list-ptx``, and its NEEDED shared libraries (DT_NEEDED in its dynamic
   section, as ``readelf -d`` shows them). cuobjdump comes from the PyPI wheel
   ``nvidia-cuda-cuobjdump``, pip-installed into a temporary folder. Where
   cuobjdump stops part way through the whole library ("Invalid ELF" on some
   cubin), the library's ``.nv_fatbin`` section is cut into its fat binaries
   and cuobjdump lists each one on its own; the architectures are the union of
   what it listed, checked against the entry headers of every fat binary (a
   mismatch is printed as a WARNING);
4. records the wheel METADATA's ``Requires-Dist`` lines of the ``cuda`` and
   ``cudnn`` extras verbatim, less a marker that only names the extra
   (``nvidia-cudnn-cu12~=9.0; extra == "cudnn"`` becomes
   ``nvidia-cudnn-cu12~=9.0``); an empty list where the wheel has no such extra.

The extracted libraries (hundreds of MB each) are deleted as soon as they are
read; the wheels are kept only when ``--work`` names a folder for them.

Run it from the repository root with any Python 3.11+ (standard library only)::

    python scripts/cuda_builds.py --out models/cuda_builds.json
    python scripts/cuda_builds.py --versions 1.20.2 1.26.0 --work /tmp/ort-wheels

It needs the network (PyPI) and about 1 GB of free disk per wheel in flight.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "onnxruntime-gpu"
# The last patch release of each minor line from 1.18 on that has a Linux x86_64 cp311 wheel.
DEFAULT_VERSIONS = [
    "1.18.1", "1.19.2", "1.20.2", "1.21.1", "1.22.0", "1.23.2", "1.24.4",
    "1.25.1", "1.26.0", "1.27.0", "1.28.0", "1.29.0", "1.30.0", "1.31.1",
]
# The only cuobjdump on PyPI is CUDA 13's; it lists the CUDA 11 and 12 builds' cubins too.
CUOBJDUMP_PACKAGE = "nvidia-cuda-cuobjdump==13.5.37"
# Newest first: pip takes the best wheel among those these tags allow.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
BUILD_INFO = "onnxruntime/capi/build_and_package_info.py"
EXTRAS = ("cuda", "cudnn")

FATBIN_MAGIC = 0xBA55ED50
FATBIN_KIND = {1: "ptx", 2: "sass"}
# cuobjdump names each listed file <base>.<n>.sm_XY.cubin or .ptx.
LISTED_ARCH = re.compile(r"\.(?:sm|compute)_(\d+[a-z]?)\.(cubin|ptx)\s*$")


# --- architecture names -----------------------------------------------------------


def arch_key(arch: str) -> tuple[int, str]:
    """'sm_61' -> (61, ''), 'sm_90a' -> (90, 'a'): numeric order, suffixed variants after the plain one."""
    match = re.fullmatch(r"sm_(\d+)([a-z]?)", arch)
    if not match:
        raise ValueError(f"not an architecture name: {arch!r}")
    return int(match.group(1)), match.group(2)


def sorted_archs(archs) -> list[str]:
    return sorted(set(archs), key=arch_key)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


# --- reading ELF files ------------------------------------------------------------------


def elf_sections(data: bytes) -> dict[str, tuple[int, int, int, int]]:
    """Section name -> (type, file offset, size, link) of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQI", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]

    def name(offset: int) -> str:
        start = names_at + offset
        return data[start:data.index(b"\0", start)].decode()

    return {name(h[0]): (h[1], h[4], h[5], h[6]) for h in headers}


def needed_libraries(data: bytes) -> list[str]:
    """The DT_NEEDED entries of an ELF64 shared library, in their order (what ``readelf -d`` lists as NEEDED)."""
    sections = elf_sections(data)
    _, dyn_at, dyn_size, _ = sections[".dynamic"]
    _, str_at, _, _ = sections[".dynstr"]
    needed = []
    for offset in range(dyn_at, dyn_at + dyn_size, 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            start = str_at + value
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def fatbins(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each fat binary in the library's .nv_fatbin section."""
    _, start, size, _ = elf_sections(data)[".nv_fatbin"]
    found, pos, end = [], start, start + size
    while pos + 16 <= end:
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-byte aligned; skip padding
            continue
        found.append((pos, header_size + body_size))
        pos += header_size + body_size
    return found


def fatbin_entry_archs(blob: bytes) -> dict[str, set[str]]:
    """{'sass': {...}, 'ptx': {...}} from the entry headers of one fat binary (kind at 0, arch at 28)."""
    archs: dict[str, set[str]] = {"sass": set(), "ptx": set()}
    _magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", blob, 0)
    pos, end = header_size, header_size + body_size
    while pos < end:
        kind, _ver, entry_header, payload = struct.unpack_from("<HHIQ", blob, pos)
        arch = struct.unpack_from("<I", blob, pos + 28)[0]
        if kind in FATBIN_KIND:
            archs[FATBIN_KIND[kind]].add(f"sm_{arch}")
        pos += entry_header + payload
    return archs


# --- cuobjdump ------------------------------------------------------------------------


@dataclass
class Cuobjdump:
    path: Path
    package: str
    version_line: str

    @classmethod
    def install(cls, package: str, into: Path) -> "Cuobjdump":
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(into), package])
        found = sorted(into.glob("nvidia/**/bin/cuobjdump"))
        if not found:
            raise SystemExit(f"{package} installed no nvidia/*/bin/cuobjdump under {into}")
        path = found[0]
        path.chmod(0o755)
        said = run([str(path), "--version"]).stdout
        release = [line.strip() for line in said.splitlines() if "release" in line]
        return cls(path, package, release[0] if release else said.strip().splitlines()[-1])

    def describe(self) -> str:
        return f"{self.package} ({self.version_line})"

    def listing(self, target: Path) -> tuple[dict[str, set[str]], bool]:
        """Architectures cuobjdump lists in ``target``, and whether it read all of it (exit 0 both times)."""
        archs: dict[str, set[str]] = {"sass": set(), "ptx": set()}
        complete = True
        for flag in ("--list-elf", "--list-ptx"):
            done = subprocess.run([str(self.path), flag, str(target)], capture_output=True, text=True)
            complete &= done.returncode == 0
            for line in done.stdout.splitlines():
                match = LISTED_ARCH.search(line)
                if match:
                    archs["sass" if match.group(2) == "cubin" else "ptx"].add(f"sm_{match.group(1)}")
        return archs, complete

    def toolkits(self, fatbin: Path, scratch: Path) -> set[int]:
        """The CUDA toolkit versions (e.g. 122) in the ELF headers of the cubins cuobjdump extracts from ``fatbin``."""
        subprocess.run([str(self.path), "-xelf", "all", str(fatbin)], cwd=scratch, capture_output=True, text=True)
        found = set()
        for cubin in scratch.glob("*.cubin"):
            with cubin.open("rb") as f:
                found.add(struct.unpack_from("<I", f.read(24), 20)[0])
            cubin.unlink()
        return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done


# --- one wheel ----------------------------------------------------------------------


@dataclass
class Build:
    version: str
    wheel: str
    wheel_sha256: str
    cuda_version: str
    cudnn_version: str | None
    sass: list[str]
    ptx: list[str]
    extras: dict[str, list[str]]
    needed: list[str]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "package": PACKAGE, "version": self.version,
            "cuda_version": self.cuda_version, "cuda_major": int(self.cuda_version.split(".")[0]),
            "cudnn_version": self.cudnn_version, "sass": self.sass, "ptx": self.ptx,
            "extras": self.extras, "needed": self.needed,
            "wheel": self.wheel, "wheel_sha256": self.wheel_sha256,
        }


def download(version: str, python_tag: str, into: Path) -> tuple[Path, float | None]:
    """The wheel's path, and the seconds pip took to download it (None when it was already in ``into``)."""
    pattern = f"{PACKAGE.replace('-', '_')}-{version}-{python_tag}-*.whl"
    had = set(into.glob(pattern))
    digits = python_tag.removeprefix("cp")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", f"{digits[0]}.{digits[1:]}", "--implementation", "cp", "--abi", python_tag]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{PACKAGE}=={version}", "-d", str(into)]
    started = time.monotonic()
    run(cmd)
    took = time.monotonic() - started
    wheels = sorted(into.glob(pattern))
    if len(wheels) != 1:
        raise SystemExit(f"expected one {PACKAGE} {version} {python_tag} wheel in {into}, found {wheels}")
    return wheels[0], None if wheels[0] in had else took


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_info(wheel: zipfile.ZipFile) -> dict[str, str]:
    """The string assignments in build_and_package_info.py, or {} when the wheel has none."""
    try:
        text = wheel.read(BUILD_INFO).decode()
    except KeyError:
        return {}
    return dict(re.findall(r"^(\w+)\s*=\s*['\"]([^'\"]*)['\"]", text, re.MULTILINE))


def extras(wheel: zipfile.ZipFile) -> dict[str, list[str]]:
    """The Requires-Dist lines of the cuda and cudnn extras, verbatim but for a marker that only names the extra.

    ``nvidia-cudnn-cu12~=9.0; extra == "cudnn"`` is listed under "cudnn" as
    ``nvidia-cudnn-cu12~=9.0``; a line whose marker says more keeps all of it.
    """
    metadata = next(n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
    requires = [line.split(":", 1)[1].strip() for line in wheel.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    found: dict[str, list[str]] = {}
    for extra in EXTRAS:
        only_extra = re.compile(rf"""\s*;\s*extra\s*==\s*["']{extra}["']\s*$""")
        found[extra] = [only_extra.sub("", r) for r in requires
                        if re.search(rf"""extra\s*==\s*["']{extra}["']""", r)]
    return found


def read_build(version: str, wheel_path: Path, cuobjdump: Cuobjdump, scratch: Path) -> Build:
    notes = []
    with zipfile.ZipFile(wheel_path) as wheel:
        info = build_info(wheel)
        wheel_extras = extras(wheel)
        wheel.extract(PROVIDER, scratch)
    library = scratch / PROVIDER
    try:
        archs, complete = cuobjdump.listing(library)
        data = library.read_bytes()
        needed = needed_libraries(data)
        blobs = fatbins(data)
        headers: dict[str, set[str]] = {"sass": set(), "ptx": set()}
        for offset, length in blobs:
            for kind, found in fatbin_entry_archs(data[offset:offset + length]).items():
                headers[kind] |= found
        one = scratch / "one.fatbin"
        offset, length = blobs[0]
        one.write_bytes(data[offset:offset + length])
        toolkits = cuobjdump.toolkits(one, scratch)
        unread = 0
        if not complete:
            # cuobjdump gave up on the whole library: list each fat binary on its own.
            for offset, length in blobs:
                one.write_bytes(data[offset:offset + length])
                part, whole = cuobjdump.listing(one)
                for kind in archs:
                    archs[kind] |= part[kind]
                unread += not whole
        one.unlink()
        del data
    finally:
        library.unlink()
        shutil.rmtree(scratch / "onnxruntime", ignore_errors=True)
    if not complete:
        notes.append(f"cuobjdump stopped part way through the whole library; listed its {len(blobs)} fat binaries "
                     f"one by one ({unread} of them only in part)")
    # The entry headers give the number only: cuobjdump's sm_90a is sm_90 there.
    if {k: {a.rstrip("abcdefghijklmnopqrstuvwxyz") for a in v} for k, v in archs.items()} != headers:
        notes.append(f"WARNING: the fat binary headers name SASS {sorted_archs(headers['sass'])} PTX "
                     f"{sorted_archs(headers['ptx'])}, cuobjdump listed SASS {sorted_archs(archs['sass'])} "
                     f"PTX {sorted_archs(archs['ptx'])}")
    # CUDA 11 and 12 write their version (122 for 12.2) into the cubins' e_version; CUDA 13's cubins hold 1 there.
    toolkits = {t for t in toolkits if t >= 100}
    toolkit = ", ".join(f"{t // 10}.{t % 10}" for t in sorted(toolkits)) or "unknown (not in the cubins' ELF headers)"
    if "cuda_version" in info:
        cuda_version = info["cuda_version"]
        notes.append(f"cuda_version from {BUILD_INFO}; cubins compiled by CUDA {toolkit}")
    elif len(toolkits) == 1:
        (only,) = toolkits
        cuda_version = f"{only // 10}.{only % 10}"
        notes.append(f"no {BUILD_INFO}: cuda_version is the CUDA toolkit in the cubins' ELF headers")
    else:
        raise SystemExit(f"{version}: no {BUILD_INFO} and the cubins name CUDA toolkits {toolkit}")
    return Build(version=version, wheel=wheel_path.name, wheel_sha256=sha256(wheel_path),
                 cuda_version=cuda_version, cudnn_version=info.get("cudnn_version"),
                 sass=sorted_archs(archs["sass"]), ptx=sorted_archs(archs["ptx"]),
                 extras=wheel_extras, needed=needed, notes=notes)


# --- the table ------------------------------------------------------------------------


def table(builds: list[Build]) -> str:
    rows = [("version", "cuda", "cudnn", "SASS", "PTX", "extras")]
    for b in builds:
        present = ",".join(k for k in EXTRAS if b.extras[k]) or "none"
        rows.append((b.version, b.cuda_version, b.cudnn_version or "-",
                     " ".join(a.removeprefix("sm_") for a in b.sass) or "-",
                     " ".join(a.removeprefix("sm_") for a in b.ptx) or "-", present))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=DEFAULT_VERSIONS, help="onnxruntime-gpu versions to read")
    parser.add_argument("--out", default="models/cuda_builds.json", help="the JSON table to write")
    parser.add_argument("--work", help="keep the downloaded wheels in this folder (default: a temporary one)")
    parser.add_argument("--python-tag", default="cp311", help="the CPython tag of the wheels to read")
    parser.add_argument("--cuobjdump-package", default=CUOBJDUMP_PACKAGE, help="the pip requirement for cuobjdump")
    args = parser.parse_args(argv)

    command = ["python", "scripts/cuda_builds.py", "--versions", *args.versions, "--out", args.out]
    if args.python_tag != "cp311":
        command += ["--python-tag", args.python_tag]
    if args.cuobjdump_package != CUOBJDUMP_PACKAGE:
        command += ["--cuobjdump-package", args.cuobjdump_package]

    with tempfile.TemporaryDirectory(prefix="cuda_builds-") as tmp:
        tmp = Path(tmp)
        work = Path(args.work) if args.work else tmp / "wheels"
        work.mkdir(parents=True, exist_ok=True)
        cuobjdump = Cuobjdump.install(args.cuobjdump_package, tmp / "cuobjdump")
        print(f"cuobjdump: {cuobjdump.describe()}", flush=True)
        scratch = tmp / "scratch"
        scratch.mkdir()
        builds = []
        versions = sorted(set(args.versions), key=version_key)
        for n, version in enumerate(versions, 1):
            wheel, took = download(version, args.python_tag, work)
            size_mb = wheel.stat().st_size / 1e6
            fetched = "already in --work" if took is None else f"downloaded in {took:.1f} s ({size_mb / took:.0f} MB/s)"
            found = read_build(version, wheel, cuobjdump, scratch)
            builds.append(found)
            print(f"[{n}/{len(versions)}] {PACKAGE} {version}: {wheel.name} {size_mb:.1f} MB, {fetched}; CUDA {found.cuda_version}, cuDNN {found.cudnn_version or '-'}; SASS {' '.join(found.sass)}; "
                  f"PTX {' '.join(found.ptx) or '-'}", flush=True)
            for note in found.notes:
                print(f"    {note}", flush=True)
            if not args.work:
                wheel.unlink()

    result = {
        "generated_by": shlex.join(command),
        "generated_at": datetime.date.today().isoformat(),
        "cuobjdump": cuobjdump.describe(),
        "builds": [b.to_json() for b in builds],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {out}\n\n{table(builds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
