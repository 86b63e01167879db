"""The checks only a real NVIDIA GPU can answer, in one run: what ran on CUDA, whether it agrees
with the CPU, what a CUDA failure does, what the doctor says, and how much faster CUDA is.

    .venv/bin/python scripts/gpu_check.py [--models DIR] [--data DIR] [--out gpu_check.json] [--reps 20]

On a host set up with scripts/setup.sh (which installs the onnxruntime-gpu line
for the card), it

1. builds each worker's runtime twice, as a pool process would (IDENT_DEVICE=auto,
   then IDENT_DEVICE=cpu), and lists the provider of every model and its reason;
2. runs every sample photo and recording of --data through both and checks
   cosine >= 0.999 between the CUDA and the CPU embedding of each face and voice;
3. provokes failures: every session's CUDA arena capped at 1 MiB (ORT's own
   allocation failure) must move each model to the CPU with reason
   out_of_memory under auto, and refuse with DeviceUnavailable under strict cuda;
4. runs `ident doctor --json`;
5. times each pipeline over the samples on CUDA and on the CPU, side by side.

It writes everything to --out and exits 1 if any check failed. On a host
without CUDA it says so and exits 2: nothing here means anything on the CPU alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.cuda import CUDA_EP  # noqa: E402
from tasks.errors import DeviceUnavailable  # noqa: E402
from tasks.settings import Settings  # noqa: E402

COSINE_FLOOR = 0.999
KINDS = {"vision": ("images", (".jpg", ".jpeg", ".png")), "audio": ("audio", (".wav", ".flac", ".mp3"))}


def runtime(kind: str, **ident) -> object:
    import workers.audio  # noqa: F401 -- registers the pipelines
    import workers.vision  # noqa: F401
    from workers.runtime import WorkerRuntime

    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env.update({f"IDENT_{k.upper()}": str(v) for k, v in ident.items()})
    return WorkerRuntime(kind, Settings.from_env(env), process_index=0, pool_processes=1)


def samples(data: Path, kind: str) -> list[Path]:
    folder, suffixes = KINDS[kind]
    return sorted(p for p in (data / folder).rglob("*") if p.suffix.lower() in suffixes)


def embeddings(kind: str, result: dict) -> list[np.ndarray]:
    if kind == "vision":
        return [np.asarray(face["embedding"], np.float32) for face in result["faces"] if face.get("embedding")]
    return [np.asarray(result["embedding"], np.float32)] if result.get("embedding") else []


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def parity(kind: str, gpu, cpu, files: list[Path]) -> dict:
    rows, worst = [], 1.0
    for path in files:
        payload = path.read_bytes()
        try:
            on_gpu, on_cpu = gpu.pipeline.analyze(payload), cpu.pipeline.analyze(payload)
        except Exception as exc:  # noqa: BLE001 -- a sample the pipeline refuses is reported, not fatal
            rows.append({"file": path.name, "refused": f"{type(exc).__name__}: {exc}"})
            continue
        pairs = list(zip(embeddings(kind, on_gpu), embeddings(kind, on_cpu)))
        cosines = [cosine(a, b) for a, b in pairs]
        worst = min([worst, *cosines])
        rows.append({"file": path.name, "embeddings": len(pairs), "min_cosine": min(cosines, default=None)})
    return {"files": rows, "min_cosine": worst, "ok": worst >= COSINE_FLOOR}


def timing(runner, files: list[Path], reps: int) -> float:
    payloads = [p.read_bytes() for p in files]
    for payload in payloads:  # warm-up: arenas, cuDNN's algorithm choice
        try:
            runner.pipeline.analyze(payload)
        except Exception:  # noqa: BLE001
            pass
    started, jobs = time.perf_counter(), 0
    for _ in range(reps):
        for payload in payloads:
            try:
                runner.pipeline.analyze(payload)
            except Exception:  # noqa: BLE001
                pass
            jobs += 1
    return round((time.perf_counter() - started) * 1000 / max(1, jobs), 2)


def provoked(kind: str) -> dict:
    auto = runtime(kind, device="auto", gpu_mem_limit_mb=1)
    reasons = {s.spec.key: s.reason_code for s in auto.sessions.values()}
    try:
        runtime(kind, device="cuda", gpu_mem_limit_mb=1, cpu_models="")
        strict = "started (expected DeviceUnavailable)"
    except DeviceUnavailable as exc:
        strict = f"DeviceUnavailable: {exc}"
    ok = all(code in ("out_of_memory", "cpu_models") for code in reasons.values()) and strict.startswith("Device")
    return {"auto_reasons": reasons, "auto_messages": auto.message(), "strict": strict, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="IDENT_MODELS_DIR (default: the setting's)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if args.models:
        os.environ["IDENT_MODELS_DIR"] = str(args.models)
    import onnxruntime as ort

    report: dict = {"host": platform.node(), "onnxruntime": ort.__version__,
                    "cuda_build": ort.capi.build_and_package_info.cuda_version, "kinds": {}}
    from models.cuda_builds import query_gpus

    gpus, problem = query_gpus()
    report["gpu"] = gpus or problem
    failed = []
    for kind in KINDS:
        gpu, cpu = runtime(kind, device="auto"), runtime(kind, device="cpu")
        providers = {s.spec.key: {"provider": s.provider, "reason": s.reason_code, "message": s.cpu_reason}
                     for s in gpu.sessions.values()}
        if not any(p["provider"] == CUDA_EP for p in providers.values()):
            print(f"{kind}: nothing runs on CUDA here ({gpu.message()}); this check needs a GPU", file=sys.stderr)
            return 2
        files = samples(args.data, kind)
        row = {"providers": providers, "parity": parity(kind, gpu, cpu, files), "provoked": provoked(kind)}
        cuda_ms, cpu_ms = timing(gpu, files, args.reps), timing(cpu, files, args.reps)
        row["ms_per_job"] = {"cuda": cuda_ms, "cpu": cpu_ms, "speedup": round(cpu_ms / cuda_ms, 2)}
        report["kinds"][kind] = row
        failed += [f"{kind} {name}" for name in ("parity", "provoked") if not row[name]["ok"]]
        print(f"{kind}: {sum(p['provider'] == CUDA_EP for p in providers.values())}/{len(providers)} models on CUDA; "
              f"min cosine {row['parity']['min_cosine']:.5f}; {cuda_ms} ms/job on CUDA, {cpu_ms} on CPU")
    doctor = subprocess.run([sys.executable, "-m", "ident.cli", "doctor", "--json"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    report["doctor"] = {"exit": doctor.returncode, "report": json.loads(doctor.stdout or "null")}
    report["failed"] = failed
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}; failed: {', '.join(failed) or 'nothing'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
