"""Embedding and liveness stages, one face per call against one batch per call.

Prints JSON: per-face milliseconds for each stage at each batch size, and the
speed-up of the largest batch over batch 1, on this machine's CPU (or CUDA when
IDENT_DEVICE allows it). Part of scripts/benchmarks.sh.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.catalog import CATALOG  # noqa: E402
from models.runtime import open_session, plan_device  # noqa: E402
from tasks.settings import load_settings  # noqa: E402
from workers.vision.align import align_faces  # noqa: E402
from workers.vision.arcface import ArcFace  # noqa: E402
from workers.vision.imaging import decode_image  # noqa: E402
from workers.vision.minifasnet import LivenessEnsemble, MiniFASNet  # noqa: E402
from workers.vision.yunet import YuNet  # noqa: E402

BATCHES = (1, 4, 8, 16)
FACES = 16
REPEATS = 5


def faces_from_shared(data: Path, detector: YuNet):
    items, crops = [], []
    for path in sorted((data / "images").rglob("*.jpg")):
        image = decode_image(path.read_bytes(), 50_000_000)
        found = detector.detect(image)
        for box, marks in zip(found.boxes, found.landmarks):
            items.append((image, box))
            crops.append(align_faces(image, marks[None], CATALOG["arcface_mobilefacenet"].params["template"])[0])
            if len(items) == FACES:
                return items, np.stack(crops)
    return items, np.stack(crops)


def per_face_ms(run, count: int, batch: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for start in range(0, count, batch):
            run(start, min(start + batch, count))
        best = min(best, (time.perf_counter() - started) * 1000.0 / count)
    return round(best, 3)


def main() -> None:
    settings = load_settings()
    threads = int(os.environ.get("IDENT_CPU_THREADS", "1"))
    plan = plan_device(settings.device, settings.gpu_ids[0])
    session = lambda key: open_session(CATALOG[key], settings.models_dir, plan, threads)  # noqa: E731
    detector = YuNet(session("yunet_2023mar"), CATALOG["yunet_2023mar"])
    data = Path(os.environ.get("IDENT_SAMPLES_DIR", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    items, crops = faces_from_shared(data, detector)
    embedder = ArcFace(session("arcface_mobilefacenet"), CATALOG["arcface_mobilefacenet"])
    liveness = LivenessEnsemble([MiniFASNet(session(k), CATALOG[k]) for k in ("minifasnet_v2", "minifasnet_v1se")])
    provider = "CUDAExecutionProvider" if plan.device_id is not None else "CPUExecutionProvider"
    report = {"faces": len(items), "threads": threads, "provider": provider, "stages": {}}
    for name, run in (
        ("embedding", lambda a, b: embedder.embed(crops[a:b])),
        ("liveness", lambda a, b: liveness.score(items[a:b])),
    ):
        timings = {batch: per_face_ms(run, len(items), batch) for batch in BATCHES}
        report["stages"][name] = {
            "per_face_ms": timings,
            "speedup_largest_batch": round(timings[1] / timings[BATCHES[-1]], 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
