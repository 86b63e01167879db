"""Make the reference fixtures under tests/audio/fixtures/ with the upstream code.

The audio tests compare our numpy reimplementations against numbers produced
ONCE by the original libraries, so this script runs in a scratch virtualenv
that the project never depends on (torch is far too heavy for the workers)::

    python3 -m venv /tmp/scratch
    /tmp/scratch/bin/pip install torch==2.13.0 silero-vad==6.2.3 soundfile numpy onnxruntime
    /tmp/scratch/bin/pip download --no-deps torchaudio==2.11.0 -d /tmp/ta
    /tmp/scratch/bin/pip install --no-deps /tmp/ta/torchaudio-2.11.0-*.whl
    /tmp/scratch/bin/python scripts/make_audio_fixtures.py --data ../shared/data

It writes two files:

``silero_upstream_silero_test_60s.json``
    silero-vad 6.2.3's own ``get_speech_timestamps`` (``load_silero_vad(onnx=True)``,
    i.e. its ``OnnxWrapper`` around the same silero_vad.onnx the fleet runs,
    sha256 1a153a22...) on audio/vad/silero_test_60s.wav, for several parameter
    sets, as sample offsets; plus the per-chunk probabilities the upstream
    wrapper produced, so the pure segment logic can be compared exactly.

``kaldi_fbank_reference.json``
    ``torchaudio.compliance.kaldi.fbank`` (torchaudio 2.11.0, run on torch
    2.13.0, in float64) on 300 frames of audio/speakers/librispeech_1688_01.wav, once with
    the CAM++ recipe options (povey window, waveform in [-1, 1]) and once with
    the WeSpeaker recipe options (hamming window, waveform * 32768). This is an
    implementation independent of kaldi-native-fbank, which the workers use.
    torchaudio 2.11's compiled extension does not load against torch 2.13, so
    its pure-Python ``compliance/kaldi.py`` is loaded on its own with a stub
    ``torchaudio`` module (that file only touches ``torchaudio.functional`` for
    MFCCs, which are not used here).

Audio is read with soundfile as float32 in [-1, 1], which is what both
upstream ``read_audio`` and ``torchaudio.load`` give for 16-bit PCM.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "audio" / "fixtures"

VAD_FILE = "audio/vad/silero_test_60s.wav"
FBANK_FILE = "audio/speakers/librispeech_1688_01.wav"
FBANK_FIRST_FRAME = 50
FBANK_FRAMES = 300

# Parameter sets given to upstream get_speech_timestamps; the first is the
# upstream default, the others exercise the max-speech-duration splitting.
VAD_RUNS = [
    {},
    {"max_speech_duration_s": 3.0},
    {"max_speech_duration_s": 3.0, "use_max_poss_sil_at_max_speech": False},
    {"max_speech_duration_s": 1.5},
    {"threshold": 0.7, "min_silence_duration_ms": 300, "speech_pad_ms": 100},
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_mono(path: Path) -> np.ndarray:
    wave, rate = sf.read(str(path), dtype="float32")
    if rate != 16000 or wave.ndim != 1:
        raise SystemExit(f"{path}: expected 16 kHz mono, got {rate} Hz shape {wave.shape}")
    return wave


def silero_reference(data: Path) -> dict:
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    model = load_silero_vad(onnx=True)
    probs: list[float] = []

    class Recording:
        """Passes every call through to the upstream wrapper, keeping its output."""

        def reset_states(self):
            probs.clear()
            model.reset_states()

        def __call__(self, chunk, sr):
            out = model(chunk, sr)
            probs.append(float(out.item()))
            return out

    audio = torch.from_numpy(read_mono(data / VAD_FILE))
    runs = []
    for params in VAD_RUNS:
        stamps = get_speech_timestamps(audio, Recording(), sampling_rate=16000, **params)
        runs.append({"params": params, "segments_samples": [[s["start"], s["end"]] for s in stamps]})
    return {
        "made_with": {
            "script": "scripts/make_audio_fixtures.py",
            "silero_vad": importlib.metadata.version("silero-vad"),
            "torch": torch.__version__,
            "onnxruntime": importlib.metadata.version("onnxruntime"),
            "model": "silero_vad/data/silero_vad.onnx via load_silero_vad(onnx=True)",
            "model_sha256": sha256(Path(importlib.util.find_spec("silero_vad").origin).parent / "data" / "silero_vad.onnx"),
            "call": "get_speech_timestamps(audio, model, sampling_rate=16000, **params)",
        },
        "file": VAD_FILE,
        "file_sha256": sha256(data / VAD_FILE),
        "num_samples": int(audio.shape[0]),
        "probs": probs,
        "runs": runs,
    }


def load_torchaudio_kaldi():
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("torchaudio is not installed in this venv (see the module docstring)")
    path = Path(list(spec.submodule_search_locations)[0]) / "compliance" / "kaldi.py"
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    module_spec = importlib.util.spec_from_file_location("torchaudio_compliance_kaldi", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, path


def fbank_reference(data: Path) -> dict:
    import torch

    kaldi, kaldi_path = load_torchaudio_kaldi()
    # float64 so the reference carries no float32 rounding of its own: in the
    # log of near-silent mel bins (log energy < -15) float32 implementations,
    # Kaldi's included, scatter by up to ~9e-4 around the exact value.
    wave = torch.from_numpy(read_mono(data / FBANK_FILE).astype(np.float64)).unsqueeze(0)
    variants = {
        "povey": {"window_type": "povey", "waveform_scale": 1.0},
        "hamming_x32768": {"window_type": "hamming", "waveform_scale": 32768.0},
    }
    out = {}
    for name, opts in variants.items():
        feats = kaldi.fbank(
            wave * opts["waveform_scale"],
            num_mel_bins=80,
            frame_length=25.0,
            frame_shift=10.0,
            dither=0.0,
            energy_floor=0.0,
            window_type=opts["window_type"],
            sample_frequency=16000.0,
            snip_edges=True,
        )
        chunk = feats[FBANK_FIRST_FRAME : FBANK_FIRST_FRAME + FBANK_FRAMES].numpy().astype(np.float64)
        out[name] = {
            "options": opts,
            "total_frames": int(feats.shape[0]),
            "frames": [[round(float(v), 5) for v in row] for row in chunk],
        }
    return {
        "made_with": {
            "script": "scripts/make_audio_fixtures.py",
            "function": "torchaudio.compliance.kaldi.fbank (torchaudio 2.11.0, pure-Python file loaded on its own)",
            "kaldi_py_sha256": sha256(kaldi_path),
            "torch": torch.__version__,
            "call": "fbank(wave * waveform_scale, num_mel_bins=80, frame_length=25, frame_shift=10, dither=0, "
            "energy_floor=0, window_type=..., sample_frequency=16000, snip_edges=True); other options default "
            "(preemphasis 0.97, remove_dc_offset, round_to_power_of_two, low_freq 20, use_log_fbank, use_power)",
            "precision": "computed in float64 from the float32 samples, rounded to 5 decimals",
        },
        "file": FBANK_FILE,
        "file_sha256": sha256(data / FBANK_FILE),
        "first_frame": FBANK_FIRST_FRAME,
        "num_frames": FBANK_FRAMES,
        "variants": out,
    }


def to_json(value, indent: int = 0) -> str:
    """JSON with one line per list of numbers, so the fixtures diff and read well."""
    pad = " " * indent
    if isinstance(value, dict):
        items = [f'{pad} {json.dumps(k)}: {to_json(v, indent + 1).lstrip()}' for k, v in value.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and all(isinstance(v, (list, dict)) for v in value):
        return pad + "[\n" + ",\n".join(to_json(v, indent + 1) for v in value) + "\n" + pad + "]"
    return pad + json.dumps(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, make in (
        ("silero_upstream_silero_test_60s.json", silero_reference),
        ("kaldi_fbank_reference.json", fbank_reference),
    ):
        target = args.out / name
        target.write_text(to_json(make(args.data)) + "\n")
        sys.stdout.write(f"wrote {target} ({target.stat().st_size} bytes)\n")


if __name__ == "__main__":
    main()
