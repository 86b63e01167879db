"""Speaker embedding: a fixed-length voiceprint of who is speaking.

Model in use: 3D-Speaker CAM++ ``speech_campplus_sv_zh_en_16k-common_advanced``
(ModelScope iic, trained on ~200k Chinese and English speakers), Apache-2.0,
converted to ONNX here; catalog key ``campplus_sv_zh_en``. It stands in for
WeSpeaker's ``voxceleb_ECAPA512_LM.onnx`` (catalog key
``wespeaker_ecapa512_lm``, CC-BY-4.0), which could not be obtained; both take
the same kind of input, so either runs here with its own catalog options.

I/O: float32 [B, T, 80] log-mel filterbanks (input ``feature`` for CAM++,
``feats`` for WeSpeaker) -> [B, 192] embedding, not normalised by the model.

Preprocessing follows each model's training recipe, which is why the options
live in the catalog and not here:

* Kaldi fbank (kaldi-native-fbank): 80 mel bins, 25 ms frames every 10 ms,
  dither 0, snip_edges, pre-emphasis 0.97, DC removal, low frequency 20 Hz,
  log power. CAM++ uses the povey window on the waveform in [-1, 1];
  WeSpeaker uses a hamming window on the waveform scaled by 32768.
* CMN: the mean over time of each bin is subtracted (no variance scaling).

The output is L2-normalised, so the cosine similarity of two embeddings is
their dot product.

Batching: utterances of different lengths cannot share a batch without
changing what the model sees (zero padding enters its statistics pooling).
Instead each utterance longer than ``BUCKET_FRAMES`` frames is cut at the end
to a multiple of ``BUCKET_FRAMES`` (20 frames = 0.2 s, so at most 0.19 s is
dropped) and utterances of equal frame count run as one batch. The cut depends
only on the utterance itself, so an embedding is the same whether it was
computed alone or batched with others. Utterances longer than
``MAX_FRAMES`` (60 s of speech) keep their first 60 s. The cut comes before
CMN, so the mean is that of the frames the model sees.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Mapping, Sequence

import kaldi_native_fbank as knf
import numpy as np

from models.catalog import CATALOG
from tasks.errors import ConfigurationError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
BUCKET_FRAMES = 20
MAX_FRAMES = 6000
BATCH_SIZE = 8
# Below this the fbank has too few frames for the model's convolutions to mean
# anything; shorter speech is tiled up to it.
MIN_FRAMES = 20

# The substitute's recipe is the default: what the shipped model was trained on.
DEFAULT_FBANK = CATALOG["campplus_sv_zh_en"].params["fbank"]


def fbank(wave: np.ndarray, options: Mapping[str, Any] | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi log-mel filterbank [T, num_bins] float32 of a mono waveform in [-1, 1].

    ``options`` are a catalog entry's ``fbank`` params; ``waveform_scale``
    multiplies the waveform first (32768 for recipes trained on int16 values).
    Returns zero frames when the waveform is shorter than one frame.
    """
    opts = {**DEFAULT_FBANK, **(options or {})}
    fo = knf.FbankOptions()
    fo.frame_opts.samp_freq = float(sample_rate)
    fo.frame_opts.frame_length_ms = float(opts["frame_length_ms"])
    fo.frame_opts.frame_shift_ms = float(opts["frame_shift_ms"])
    fo.frame_opts.dither = float(opts["dither"])
    fo.frame_opts.window_type = str(opts["window_type"])
    fo.frame_opts.snip_edges = True
    fo.mel_opts.num_bins = int(opts["num_bins"])
    extractor = knf.OnlineFbank(fo)
    scaled = np.asarray(wave, dtype=np.float32) * np.float32(opts["waveform_scale"])
    extractor.accept_waveform(float(sample_rate), scaled)
    extractor.input_finished()
    count = extractor.num_frames_ready
    if count == 0:
        return np.zeros((0, fo.mel_opts.num_bins), dtype=np.float32)
    return np.stack([extractor.get_frame(i) for i in range(count)]).astype(np.float32, copy=False)


def cmn(feats: np.ndarray) -> np.ndarray:
    """Cepstral mean normalisation: subtract each bin's mean over time."""
    if len(feats) == 0:
        return feats
    return (feats - feats.mean(axis=0, keepdims=True)).astype(np.float32, copy=False)


def bucket_length(frames: int, bucket: int = BUCKET_FRAMES, max_frames: int = MAX_FRAMES) -> int:
    """Frames kept of an utterance ``frames`` long (see the module doc on batching)."""
    frames = min(frames, max_frames)
    if frames <= bucket:
        return frames
    return frames - frames % bucket


def fit_length(feats: np.ndarray, min_frames: int = MIN_FRAMES) -> np.ndarray:
    """Crop to :func:`bucket_length`, or tile very short features up to ``min_frames``."""
    count = len(feats)
    if count == 0:
        raise ValueError("no fbank frames: the speech is shorter than one 25 ms frame")
    if count < min_frames:
        return np.tile(feats, (-(-min_frames // count), 1))[:min_frames]
    return feats[: bucket_length(count)]


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class SpeakerEmbedder:
    """L2-normalised speaker embeddings of 16 kHz speech, with the catalog model's own fbank options."""

    def __init__(self, session: Any, spec: Any, *, batch_size: int = BATCH_SIZE) -> None:
        params = spec.params
        self.session = session
        self.key = spec.key
        self.fbank_options = dict(params.get("fbank", DEFAULT_FBANK))
        self.use_cmn = bool(params.get("cmn", True))
        self.batch_size = batch_size
        self.input_name = self._input_name(session, params.get("input_name"), spec.key)

    @staticmethod
    def _input_name(session: Any, wanted: str | None, key: str) -> str:
        names = [inp.name for inp in session.get_inputs()]
        if wanted in names:
            return wanted
        if len(names) == 1:
            log.warning("speaker model %s: catalog input name %r not in the session; using its only input %r",
                        key, wanted, names[0])
            return names[0]
        raise ConfigurationError(
            f"speaker model {key}: the session has inputs {names} and none is the catalog's {wanted!r}; "
            "check IDENT_SPEAKER_MODEL against the file in IDENT_MODELS_DIR"
        )

    def features(self, wave: np.ndarray) -> np.ndarray:
        """The model input of one utterance: fbank, cut to its bucket, CMN, then :func:`fit_length`."""
        feats = fbank(wave, self.fbank_options)
        # The mean is taken over the frames the model sees: past 60 s of speech
        # the rest is dropped, and must not shift what is kept.
        feats = feats[: bucket_length(len(feats))]
        if self.use_cmn:
            feats = cmn(feats)
        return fit_length(feats)

    def embed_many(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """[N, D] unit-length embeddings; utterances of equal kept length share a batch."""
        feats = [self.features(w) for w in waves]
        return self.embed_features(feats)

    def embed_features(self, feats: Sequence[np.ndarray]) -> np.ndarray:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, f in enumerate(feats):
            groups[len(f)].append(i)
        out: list[np.ndarray | None] = [None] * len(feats)
        for members in groups.values():
            for j in range(0, len(members), self.batch_size):
                part = members[j : j + self.batch_size]
                batch = np.stack([feats[i] for i in part]).astype(np.float32, copy=False)
                (emb, *_rest) = self.session.run(None, {self.input_name: batch})
                for i, vector in zip(part, np.asarray(emb, dtype=np.float32)):
                    out[i] = vector
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return l2_normalise(np.stack(out))

    def embed(self, wave: np.ndarray) -> np.ndarray:
        return self.embed_many([wave])[0]
