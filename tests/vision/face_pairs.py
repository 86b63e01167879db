"""Face-pair scoring shared by the identity tests and the threshold calibration.

Run as a script to print the calibration summary that docs/vision.md quotes::

    .venv/bin/python tests/vision/face_pairs.py [--extra DIR]

``--extra DIR`` widens the check with photos of other people (see
:func:`extra_faces`): every pair of faces of different people, not only the
labelled pairs, as docs/vision.md "Widened with other people" does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PairScores:
    same: list[tuple[str, str, float]]
    different: list[tuple[str, str, float]]

    @property
    def same_scores(self) -> np.ndarray:
        return np.array([s for _, _, s in self.same])

    @property
    def different_scores(self) -> np.ndarray:
        return np.array([s for _, _, s in self.different])


def largest_face_embeddings(analyses: dict[str, dict]) -> dict[str, np.ndarray]:
    """The embedding of each photo's largest face (analyze lists the largest first)."""
    return {path: np.array(r["faces"][0]["embedding"]) for path, r in analyses.items() if r["faces"]}


def pair_scores(analyses: dict[str, dict], labels: dict) -> PairScores:
    emb = largest_face_embeddings(analyses)

    def score(pairs):
        return [(a, b, float(emb[a] @ emb[b])) for a, b in pairs]

    return PairScores(score(labels["pairs"]["face_same_person"]), score(labels["pairs"]["face_different_person"]))


def extra_faces(analyses: dict[str, dict]) -> list[tuple[str, str, np.ndarray]]:
    """(person, face label, embedding) of the faces in photos outside the labelled set.

    A photo named ``<person_id>__<anything>`` shows that labelled person as its
    largest face, and its other faces are left out (nobody knows who they are).
    In any other photo every face is a different person, none of them labelled.
    """
    faces = []
    for path, result in sorted(analyses.items()):
        name = Path(path).name
        person, marker, _ = name.partition("__")
        for index, face in enumerate(result["faces"][:1] if marker else result["faces"]):
            faces.append((person if marker else f"{name}#{index}", f"{name}#{index}", np.array(face["embedding"])))
    return faces


def all_pair_scores(faces: list[tuple[str, str, np.ndarray]]) -> PairScores:
    """Every pair of faces: the same person or not, by their person names."""
    same, different = [], []
    for i, (person_a, label_a, a) in enumerate(faces):
        for person_b, label_b, b in faces[i + 1 :]:
            (same if person_a == person_b else different).append((label_a, label_b, float(a @ b)))
    return PairScores(same, different)


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Probability that a random same-person pair outscores a random different-person pair."""
    pos, neg = positives[:, None], negatives[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def accuracy(scores: PairScores, threshold: float) -> float:
    right = (scores.same_scores >= threshold).sum() + (scores.different_scores < threshold).sum()
    return float(right / (len(scores.same) + len(scores.different)))


def report(scores: PairScores, threshold: float) -> str:
    pos, neg = scores.same_scores, scores.different_scores
    lines = [
        "| pairs | n | min | mean | std | max |",
        "|---|---|---|---|---|---|",
        f"| same person | {pos.size} | {pos.min():.3f} | {pos.mean():.3f} | {pos.std():.3f} | {pos.max():.3f} |",
        f"| different people | {neg.size} | {neg.min():.3f} | {neg.mean():.3f} | {neg.std():.3f} | {neg.max():.3f} |",
        "",
        f"AUC {auc(pos, neg):.4f}; accuracy at {threshold}: {accuracy(scores, threshold):.4f}; "
        f"gap between the highest different-person and lowest same-person score: {neg.max():.3f} .. {pos.min():.3f}; "
        f"Gaussian tails: different mean + 3.09 sd = {neg.mean() + 3.09 * neg.std():.3f}, "
        f"same mean - 3.09 sd = {pos.mean() - 3.09 * pos.std():.3f}",
        "",
        "| same-person pair | cosine |",
        "|---|---|",
    ]
    for a, b, s in sorted(scores.same, key=lambda t: t[2]):
        lines.append(f"| {Path(a).name} / {Path(b).name} | {s:.3f} |")
    lines += ["", "| highest different-person pairs | cosine |", "|---|---|"]
    for a, b, s in sorted(scores.different, key=lambda t: -t[2])[:8]:
        lines.append(f"| {Path(a).name} / {Path(b).name} | {s:.3f} |")
    return "\n".join(lines)


def _main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="face-pair scores and the match threshold")
    parser.add_argument("--extra", type=Path, help="photos of other people (see extra_faces)")
    args = parser.parse_args()

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "tests"))
    import onnxruntime as ort
    from conftest import data_dir, models_dir

    from models.catalog import selected_models
    from tasks.settings import Settings
    from workers.vision.pipeline import VisionPipeline

    settings = Settings(models_dir=models_dir())
    specs = selected_models(settings, "vision")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sessions = {
        role: ort.InferenceSession(str(models_dir() / spec.filename), options, providers=["CPUExecutionProvider"])
        for role, spec in specs.items()
    }
    pipeline = VisionPipeline(sessions, specs, settings)
    labels = json.loads((data_dir() / "labels.json").read_text())
    paths = sorted({p for key in ("face_same_person", "face_different_person") for pair in labels["pairs"][key] for p in pair})
    results = pipeline.analyze_many([(data_dir() / p).read_bytes() for p in paths], [{"liveness": False}] * len(paths))
    analyses = dict(zip(paths, results))
    scores = pair_scores(analyses, labels)
    sys.stdout.write(report(scores, pipeline.match_threshold) + "\n")
    if args.extra:
        people = {entry["path"]: entry["labels"].get("largest_face_person") for entry in labels["files"]}
        labelled = [
            (people[path], Path(path).name, embedding)
            for path, embedding in largest_face_embeddings(analyses).items()
            if people.get(path)
        ]
        extra_paths = sorted(p for p in args.extra.iterdir() if p.is_file())
        extra = pipeline.analyze_many([p.read_bytes() for p in extra_paths], [{"liveness": False}] * len(extra_paths))
        for path, result in zip(extra_paths, extra):
            if not isinstance(result, dict):
                sys.exit(f"{path}: {result}")
        widened = all_pair_scores(labelled + extra_faces(dict(zip(map(str, extra_paths), extra))))
        sys.stdout.write(f"\nWidened with {len(extra_paths)} photos from {args.extra}:\n\n")
        sys.stdout.write(report(widened, pipeline.match_threshold) + "\n")


if __name__ == "__main__":
    _main()
