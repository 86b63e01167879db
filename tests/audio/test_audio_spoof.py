"""AASIST anti-spoofing: windowing, batching, and scores on the labelled recordings."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from models.catalog import get_spec
from tests.audio.helpers import auc, report
from workers.audio.aasist import (
    AASIST, MAX_WINDOWS, WINDOW_SAMPLES, at_level, level_dbfs, tile, window_starts, windows,
)


def test_tile_repeats_like_upstream_pad():
    wave = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(tile(wave, 12), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    np.testing.assert_array_equal(tile(wave, 5), wave)
    np.testing.assert_array_equal(tile(np.arange(20, dtype=np.float32), 8), np.arange(8))
    with pytest.raises(ValueError):
        tile(np.zeros(0, dtype=np.float32), 8)


def test_window_layout():
    assert window_starts(1000) == [0]
    assert window_starts(WINDOW_SAMPLES) == [0]
    two = window_starts(WINDOW_SAMPLES + 1)
    assert two == [0, 1]
    starts = window_starts(int(WINDOW_SAMPLES * 2.5))
    assert len(starts) == 3 and starts[0] == 0 and starts[-1] + WINDOW_SAMPLES == int(WINDOW_SAMPLES * 2.5)
    long = window_starts(WINDOW_SAMPLES * 40)
    assert len(long) == MAX_WINDOWS and long[-1] + WINDOW_SAMPLES == WINDOW_SAMPLES * 40
    assert np.all(np.diff(long) > WINDOW_SAMPLES)  # spread out, not bunched at the start


def test_windows_shapes():
    assert windows(np.ones(100, np.float32)).shape == (1, WINDOW_SAMPLES)
    wave = np.arange(WINDOW_SAMPLES * 3, dtype=np.float32)
    out = windows(wave)
    assert out.shape == (3, WINDOW_SAMPLES) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], wave[WINDOW_SAMPLES : 2 * WINDOW_SAMPLES])


def test_at_level_sets_the_rms_and_leaves_silence_alone():
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.3
    leveled = at_level(wave, -26.0)
    assert leveled.dtype == np.float32
    assert 20 * np.log10(np.sqrt(np.mean(leveled.astype(np.float64) ** 2))) == pytest.approx(-26.0, abs=1e-3)
    np.testing.assert_allclose(leveled, wave * (leveled[0] / wave[0]), rtol=1e-5)  # one gain, no shaping
    np.testing.assert_array_equal(at_level(np.zeros(100, np.float32)), np.zeros(100, np.float32))
    assert level_dbfs(np.full(10, 0.1, np.float32)) == pytest.approx(-20.0, abs=1e-4)
    assert level_dbfs(np.zeros(10, np.float32)) == -np.inf


def test_the_score_does_not_follow_the_volume(audio_pipeline, decode_file):
    spoof = audio_pipeline.spoof
    speech, _ = decode_file("audio/antispoof/spoof/espeak_en-us.wav")
    scores = [s.score for s in spoof.score_many([speech * 0.03, speech * 0.3, speech])]
    assert max(scores) - min(scores) < 0.01, scores


# The spoofs that are rejected at their own level. Before the speech was leveled,
# each of them passed as bona fide once turned down by 20 dB.
QUIET_SPOOFS = [
    "audio/antispoof/spoof/espeak_en-us.wav",
    "audio/antispoof/spoof/festival_kal_diphone.wav",
    "audio/antispoof/spoof/trump_fake_1bB5db0Srrw.mp3",
    "audio/antispoof/spoof/trump_fake_6xxGIDfe5BU.mp3",
    "audio/antispoof/spoof/trump_fake_1bB5db0Srrw_16k_first10s.wav",
    "audio/antispoof/spoof/trump_fake_6xxGIDfe5BU_16k_first10s.wav",
]


def test_a_spoof_turned_down_is_still_a_spoof(audio_pipeline, decode_file):
    payloads = []
    for path in QUIET_SPOOFS:
        wave, _ = decode_file(path)
        buffer = io.BytesIO()
        sf.write(buffer, wave * 0.1, 16000, subtype="PCM_16", format="WAV")
        payloads.append(buffer.getvalue())
    results = audio_pipeline.analyze_many(payloads)
    verdicts = {path: (r["spoof"]["score"], r["spoof"]["is_bonafide"]) for path, r in zip(QUIET_SPOOFS, results)}
    report(f"spoofs at -20 dB: {verdicts}")
    assert not any(bonafide for _score, bonafide in verdicts.values()), verdicts


def test_speech_too_quiet_to_judge_is_never_bona_fide(audio_pipeline, decode_file):
    # Raised from -80 dBFS, this fake's own noise floor scores as genuine (docs/audio.md, "Level").
    wave, _ = decode_file("audio/antispoof/spoof/trump_fake_6xxGIDfe5BU.mp3")
    buffer = io.BytesIO()
    sf.write(buffer, wave * 10 ** (-62 / 20), 16000, subtype="PCM_16", format="WAV")
    result = audio_pipeline.analyze(buffer.getvalue())
    spoof = result["spoof"]
    report(f"a fake at {spoof['speech_level_dbfs']} dBFS: score {spoof['score']:.2f}")
    assert spoof["speech_level_dbfs"] < spoof["min_speech_level_dbfs"] == -55.0
    assert spoof["is_bonafide"] is False


def test_batched_scores_equal_single(audio_pipeline, decode_file):
    spoof = audio_pipeline.spoof
    short, _ = decode_file("audio/antispoof/spoof/dstc11_tts_mul0981_turn05.wav")
    longer, _ = decode_file("audio/speakers/librispeech_533_03.flac")
    batched = spoof.score_many([short, longer])
    assert len(batched[1].window_scores) == 2
    assert batched[0].score == pytest.approx(spoof.score(short).score, abs=1e-4)
    assert batched[1].score == pytest.approx(float(np.mean(batched[1].window_scores)), abs=1e-6)
    assert spoof.score_many([]) == []


def test_threshold_comes_from_catalog_or_settings(audio_sessions, audio_specs):
    from dataclasses import replace

    from tasks.settings import Settings
    from workers.audio.pipeline import AudioPipeline

    assert AudioPipeline(audio_sessions, audio_specs, Settings()).spoof_threshold == audio_specs["spoof"].params["threshold"]
    assert AudioPipeline(audio_sessions, audio_specs, replace(Settings(), spoof_threshold=1.5)).spoof_threshold == 1.5
    assert AASIST(audio_sessions["spoof"], get_spec("aasist")).window_samples == WINDOW_SAMPLES


def _label_groups(analyses, labelled_files):
    groups: dict[str, dict[str, float]] = {"bonafide": {}, "spoof": {}}
    for path, result in analyses.items():
        label = labelled_files[path]["labels"].get("spoof")
        if label in groups and result["spoof"] is not None:
            groups[label][path] = result["spoof"]["score"]
    return groups


def test_bonafide_scores_above_spoof(analyses, labelled_files, audio_pipeline):
    groups = _label_groups(analyses, labelled_files)
    bona, spoof = groups["bonafide"], groups["spoof"]
    threshold = audio_pipeline.spoof_threshold
    narrowband = {p for p in bona if "/fsdd_" in p}
    wideband = [s for p, s in bona.items() if p not in narrowband]

    report(f"spoof scores (AASIST bona-fide logit, mean over windows of the speech), threshold {threshold:g}:")
    for label, scores in (("bonafide", bona), ("spoof", spoof)):
        for path, score in sorted(scores.items(), key=lambda kv: kv[1]):
            verdict = "bonafide" if score >= threshold else "SPOOF"
            report(f"  {label:8s} {score:7.2f}  -> {verdict:8s} {path}")
    frr = np.mean([s < threshold for s in wideband])
    far = np.mean([s >= threshold for s in spoof.values()])
    report(
        f"  16 kHz bona fide mean {np.mean(wideband):.2f} (n={len(wideband)}), spoof mean {np.mean(list(spoof.values())):.2f} "
        f"(n={len(spoof)}), 8 kHz FSDD mean {np.mean([bona[p] for p in narrowband]):.2f}; "
        f"AUC {auc(wideband, list(spoof.values())):.3f} (with FSDD {auc(list(bona.values()), list(spoof.values())):.3f}); "
        f"at threshold: bona fide rejected {frr:.2f}, spoof accepted {far:.2f}"
    )
    assert len(spoof) == 10 and len(wideband) >= 15
    assert np.mean(list(bona.values())) > np.mean(list(spoof.values()))
    assert np.mean(wideband) > np.mean(list(spoof.values())) + 2.0


def test_spoof_result_shape(analyses):
    result = analyses["audio/antispoof/spoof/espeak_en-us.wav"]
    spoof = result["spoof"]
    assert set(spoof) == {"score", "is_bonafide", "threshold", "speech_level_dbfs", "min_speech_level_dbfs"}
    assert -40 < spoof["speech_level_dbfs"] < -10 and spoof["min_speech_level_dbfs"] == -55.0
    assert isinstance(spoof["score"], float) and isinstance(spoof["is_bonafide"], bool)
    assert spoof["is_bonafide"] is False
