"""Measure the audio thresholds on the labelled data (the numbers in docs/audio.md).

Runs :class:`workers.audio.pipeline.AudioPipeline` with real models on every
labelled recording under ``<data>/audio`` and prints

* speaker-embedding cosine scores of the labelled same / different pairs
  (16 kHz LibriSpeech and LJ Speech clips, and the short 8 kHz FSDD digit
  clips on their own), with the threshold at the middle of the gap between
  the highest different-speaker and the lowest same-speaker score;
* AASIST scores of every file labelled bona fide or spoof, and the threshold
  at the middle of the gap just below the lowest 16 kHz bona-fide score;
* with ``--compare-inputs``, how the spoof scores separate when AASIST sees
  the concatenated speech (what the pipeline does), the recording trimmed to
  its first and last speech, or the whole recording.

Usage (project virtualenv, 1 thread, about a minute per model)::

    .venv/bin/python scripts/audio_calibration.py --spoof-model aasist
    .venv/bin/python scripts/audio_calibration.py --spoof-model aasist_l --compare-inputs
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.catalog import selected_models  # noqa: E402
from tasks.settings import Settings  # noqa: E402
from workers.audio.decoding import decode  # noqa: E402
from workers.audio.pipeline import AudioPipeline, speech_audio  # noqa: E402


def auc(pos, neg) -> float:
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def open_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--models", type=Path, default=REPO.parent / "shared" / "models")
    parser.add_argument("--spoof-model", default="aasist")
    parser.add_argument("--speaker-model", default="campplus_sv_zh_en")
    parser.add_argument("--compare-inputs", action="store_true")
    args = parser.parse_args()

    settings = replace(Settings(), spoof_model=args.spoof_model, speaker_model=args.speaker_model)
    specs = selected_models(settings, "audio")
    pipeline = AudioPipeline({r: open_session(args.models / s.filename) for r, s in specs.items()}, specs, settings)
    labels = json.loads((args.data / "labels.json").read_text())
    files = {e["path"]: e["labels"] for e in labels["files"] if e["path"].startswith("audio/")}
    results = {}
    for path in sorted(files):
        results[path] = pipeline.analyze((args.data / path).read_bytes())

    def is_fsdd(p: str) -> bool:
        return "/fsdd_" in p

    def cos(a: str, b: str) -> float:
        return float(np.dot(results[a]["embedding"], results[b]["embedding"]))

    print(f"== speaker model {args.speaker_model} (threshold now {pipeline.match_threshold:g})")
    for name, keep in (("16 kHz clips", lambda a, b: not (is_fsdd(a) or is_fsdd(b))),
                       ("FSDD 8 kHz digits", lambda a, b: is_fsdd(a) or is_fsdd(b))):
        same = [cos(a, b) for a, b in labels["pairs"]["speaker_same"] if keep(a, b)]
        diff = [cos(a, b) for a, b in labels["pairs"]["speaker_different"] if keep(a, b)]
        print(f"{name}: same n={len(same)} min {min(same):.3f} mean {np.mean(same):.3f} | "
              f"different n={len(diff)} max {max(diff):.3f} mean {np.mean(diff):.3f} | AUC {auc(same, diff):.3f} | "
              f"gap midpoint {(min(same) + max(diff)) / 2:.3f}")

    print(f"\n== spoof model {args.spoof_model} (threshold now {pipeline.spoof_threshold:g})")
    scored = {p: r["spoof"]["score"] for p, r in results.items() if r["spoof"] and files[p].get("spoof")}
    bona = {p: s for p, s in scored.items() if files[p]["spoof"] == "bonafide"}
    spoof = {p: s for p, s in scored.items() if files[p]["spoof"] == "spoof"}
    for p, s in sorted(scored.items(), key=lambda kv: kv[1]):
        print(f"{s:7.2f}  {files[p]['spoof']:8s} {p}")
    wide = [s for p, s in bona.items() if not is_fsdd(p)]
    below = [s for s in spoof.values() if s < min(wide)]
    suggestion = (min(wide) + max(below)) / 2 if below else min(wide)
    print(f"16 kHz bona fide mean {np.mean(wide):.2f} min {min(wide):.2f}; spoof mean {np.mean(list(spoof.values())):.2f}; "
          f"AUC {auc(wide, list(spoof.values())):.3f}; gap midpoint below the lowest bona fide {suggestion:.2f}")

    if args.compare_inputs:
        print("\n== what AASIST sees (mean of window logits; AUC without the 8 kHz FSDD clips)")
        variants: dict[str, dict[str, float]] = {"speech (concatenated)": {}, "trimmed": {}, "whole": {}}
        for p in scored:
            wave, _ = decode((args.data / p).read_bytes(), settings.max_audio_seconds)
            segs = [(s["start_s"], s["end_s"]) for s in results[p]["speech_segments"]]
            inputs = {
                "speech (concatenated)": speech_audio(wave, segs),
                "trimmed": wave[int(segs[0][0] * 16000) : int(segs[-1][1] * 16000)],
                "whole": wave,
            }
            for name, x in inputs.items():
                variants[name][p] = pipeline.spoof.score(x).score
        for name, scores in variants.items():
            b = [s for p, s in scores.items() if p in bona and not is_fsdd(p)]
            f = [s for p, s in scores.items() if p in spoof]
            print(f"{name:22s} bona fide mean {np.mean(b):6.2f} min {min(b):6.2f} | spoof mean {np.mean(f):6.2f} "
                  f"max {max(f):6.2f} | AUC {auc(b, f):.3f}")


if __name__ == "__main__":
    main()
