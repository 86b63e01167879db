"""Speaker embeddings: fbank against an independent Kaldi implementation, CMN, batching, pair scores."""

from __future__ import annotations

import numpy as np
import pytest

from models.catalog import get_spec
from tasks.errors import ConfigurationError, NoSpeechFound
from tests.audio.helpers import auc, load_fixture, report
from workers.audio.speaker import (
    BUCKET_FRAMES,
    MIN_FRAMES,
    SpeakerEmbedder,
    bucket_length,
    cmn,
    fbank,
    fit_length,
    l2_normalise,
)

FBANK_REFERENCE = "kaldi_fbank_reference.json"


@pytest.fixture(scope="module")
def fbank_reference() -> dict:
    return load_fixture(FBANK_REFERENCE)


@pytest.mark.parametrize(
    "variant,catalog_key",
    [("povey", "campplus_sv_zh_en"), ("hamming_x32768", "wespeaker_ecapa512_lm")],
)
def test_fbank_matches_independent_kaldi_reference(fbank_reference, decode_file, variant, catalog_key):
    """kaldi-native-fbank with each catalog entry's options vs torchaudio.compliance.kaldi (float64)."""
    ref = fbank_reference["variants"][variant]
    options = get_spec(catalog_key).params["fbank"]
    assert options["window_type"] == ref["options"]["window_type"]
    assert options["waveform_scale"] == ref["options"]["waveform_scale"]
    wave, _ = decode_file(fbank_reference["file"])
    ours = fbank(wave, options)
    assert ours.shape == (ref["total_frames"], 80) and ours.dtype == np.float32
    first = fbank_reference["first_frame"]
    expected = np.array(ref["frames"])
    diff = np.abs(ours[first : first + len(expected)] - expected)
    assert diff.max() < 1e-3
    # Most bins agree far more closely; only near-silent bins carry float32 noise.
    assert np.quantile(diff, 0.99) < 2e-4


def test_window_types_really_differ(decode_file):
    wave, _ = decode_file("audio/speakers/librispeech_1688_01.wav")
    povey = cmn(fbank(wave, {"window_type": "povey"}))
    hamming = cmn(fbank(wave, {"window_type": "hamming"}))
    assert np.abs(povey - hamming).max() > 0.05


def test_fbank_of_too_short_audio_is_empty():
    assert fbank(np.zeros(399, dtype=np.float32)).shape == (0, 80)
    assert fbank(np.zeros(400, dtype=np.float32)).shape == (1, 80)


def test_cmn_removes_the_mean_only():
    rng = np.random.default_rng(0)
    feats = rng.normal(3.0, 2.0, size=(50, 80)).astype(np.float32)
    out = cmn(feats)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=0), feats.std(axis=0), rtol=1e-5)
    assert cmn(np.zeros((0, 80), dtype=np.float32)).shape == (0, 80)


def test_bucketing_and_short_tiling():
    assert bucket_length(15) == 15
    assert bucket_length(BUCKET_FRAMES) == BUCKET_FRAMES
    assert bucket_length(59) == 40 and bucket_length(60) == 60
    assert bucket_length(10_000) == 6000
    short = np.arange(5 * 80, dtype=np.float32).reshape(5, 80)
    tiled = fit_length(short)
    assert tiled.shape == (MIN_FRAMES, 80)
    np.testing.assert_array_equal(tiled[5:10], short)
    assert fit_length(np.zeros((47, 80), np.float32)).shape == (40, 80)
    with pytest.raises(ValueError):
        fit_length(np.zeros((0, 80), np.float32))


def test_l2_normalise():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


class _FakeInput:
    def __init__(self, name):
        self.name, self.shape = name, ["B", "T", 80]


class _FakeSession:
    def __init__(self, *names):
        self._inputs = [_FakeInput(n) for n in names]
        self.fed = None

    def get_inputs(self):
        return self._inputs

    def run(self, output_names, feed):
        self.fed = feed
        (batch,) = feed.values()
        return [np.ones((batch.shape[0], 4), dtype=np.float32)]


def test_input_name_comes_from_catalog_or_the_only_input():
    spec = get_spec("wespeaker_ecapa512_lm")
    session = _FakeSession("feats")
    embedder = SpeakerEmbedder(session, spec)
    assert embedder.input_name == "feats"
    assert embedder.fbank_options["window_type"] == "hamming"
    out = embedder.embed_many([np.zeros(16000, np.float32), np.zeros(8000, np.float32)])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert SpeakerEmbedder(_FakeSession("x"), spec).input_name == "x"
    with pytest.raises(ConfigurationError, match="feats"):
        SpeakerEmbedder(_FakeSession("a", "b"), spec)


def test_speech_past_60_s_does_not_shift_the_kept_features():
    """Only the first 60 s reach the model, so the CMN mean is theirs alone."""
    embedder = SpeakerEmbedder(_FakeSession("feature"), get_spec("campplus_sv_zh_en"))
    noise = np.random.default_rng(1)
    first = (0.1 * noise.standard_normal(16000 * 61)).astype(np.float32)
    louder_tail = (0.8 * noise.standard_normal(16000 * 30)).astype(np.float32)
    kept = embedder.features(first)
    assert kept.shape == (6000, 80)
    np.testing.assert_allclose(kept.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_array_equal(embedder.features(np.concatenate([first, louder_tail])), kept)


def test_batched_embeddings_equal_single(audio_pipeline, decode_file):
    waves = [decode_file(p)[0] for p in (
        "audio/speakers/librispeech_533_02.flac",
        "audio/speakers/fsdd_george_01.wav",
        "audio/speakers/librispeech_533_02.flac",
    )]
    batched = audio_pipeline.speaker.embed_many(waves)
    assert batched.shape == (3, 192)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(batched[0], audio_pipeline.speaker.embed(waves[0]), atol=1e-5)
    np.testing.assert_allclose(batched[1], audio_pipeline.speaker.embed(waves[1]), atol=1e-5)


# --- pair scores on the labelled speakers -------------------------------------


def _is_fsdd(path: str) -> bool:
    return "/fsdd_" in path


def _pair_scores(analyses, pairs) -> list[tuple[float, str, str]]:
    out = []
    for a, b in pairs:
        ea, eb = np.array(analyses[a]["embedding"]), np.array(analyses[b]["embedding"])
        out.append((float(ea @ eb), a, b))
    return out


def test_same_speaker_pairs_score_above_different_speaker_pairs(analyses, labels, audio_pipeline):
    threshold = audio_pipeline.match_threshold
    same_all = _pair_scores(analyses, labels["pairs"]["speaker_same"])
    diff_all = _pair_scores(analyses, labels["pairs"]["speaker_different"])
    same = [s for s, a, b in same_all if not (_is_fsdd(a) or _is_fsdd(b))]
    diff = [s for s, a, b in diff_all if not (_is_fsdd(a) or _is_fsdd(b))]
    fsdd_same = [s for s, a, b in same_all if _is_fsdd(a) and _is_fsdd(b)]
    fsdd_diff = [s for s, a, b in diff_all if _is_fsdd(a) or _is_fsdd(b)]

    accuracy = (sum(s >= threshold for s in same) + sum(s < threshold for s in diff)) / (len(same) + len(diff))
    report(
        f"speaker (long clips, {len(same)} same / {len(diff)} different pairs): "
        f"same min {min(same):.3f} mean {np.mean(same):.3f}; different max {max(diff):.3f} mean {np.mean(diff):.3f}; "
        f"AUC {auc(same, diff):.3f}; accuracy at threshold {threshold:g}: {accuracy:.3f}"
    )
    fsdd_accuracy = (sum(s >= threshold for s in fsdd_same) + sum(s < threshold for s in fsdd_diff)) / (
        len(fsdd_same) + len(fsdd_diff)
    )
    report(
        f"speaker (FSDD 8 kHz digits, reported only: {len(fsdd_same)} same / {len(fsdd_diff)} different pairs): "
        f"same {', '.join(f'{s:.2f}' for s in sorted(fsdd_same))}; different max {max(fsdd_diff):.3f}; "
        f"AUC {auc(fsdd_same, fsdd_diff):.3f}; accuracy at threshold {threshold:g}: {fsdd_accuracy:.3f}"
    )
    assert min(same) > max(diff)
    assert accuracy == 1.0
    assert all(len(analyses[p]["embedding"]) == 192 for p in analyses if analyses[p]["embedding"])


def test_verify_same_and_different(audio_pipeline, data_path):
    read = lambda p: (data_path / p).read_bytes()  # noqa: E731
    same = audio_pipeline.verify(read("audio/speakers/librispeech_1998_01.wav"), read("bad/speech_24bit_16k.wav"))
    assert same["same_speaker"] is True and same["model"] == "campplus_sv_zh_en"
    assert same["threshold"] == audio_pipeline.match_threshold
    different = audio_pipeline.verify(
        read("audio/speakers/librispeech_1998_01.wav"), read("audio/speakers/librispeech_2414_02.flac")
    )
    assert different["same_speaker"] is False and different["similarity"] < same["similarity"]
    assert set(same["timings_ms"]) == {"audio_a", "audio_b", "total"}
    # The speech behind each voiceprint, as analyze finds it, not the recording's length.
    assert set(same["speech_s"]) == {"audio_a", "audio_b"}
    for name, path in (("audio_a", "audio/speakers/librispeech_1998_01.wav"), ("audio_b", "bad/speech_24bit_16k.wav")):
        analysed = audio_pipeline.analyze(read(path), {"spoof": False, "embed": False})
        speech = sum(s["end_s"] - s["start_s"] for s in analysed["speech_segments"])
        assert same["speech_s"][name] == pytest.approx(speech, abs=1e-3)
        assert 0 < same["speech_s"][name] < analysed["duration_s"]


def test_verify_without_speech_names_the_input(audio_pipeline, data_path):
    speech = (data_path / "audio/speakers/librispeech_533_01.wav").read_bytes()
    silence = (data_path / "audio/nonspeech/digital_silence_3s_16k.wav").read_bytes()
    with pytest.raises(NoSpeechFound, match="audio_b"):
        audio_pipeline.verify(speech, silence)
    with pytest.raises(NoSpeechFound, match="audio_a"):
        audio_pipeline.verify(silence, speech)


def test_every_speaker_pair_listed_is_analysed(labels, analyses):
    listed = {p for kind in ("speaker_same", "speaker_different") for pair in labels["pairs"][kind] for p in pair}
    assert listed <= set(analyses)
    assert all(analyses[p]["embedding"] is not None for p in listed)
