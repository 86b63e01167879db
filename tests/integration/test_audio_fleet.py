"""audio.analyze and audio.verify through the real queue, on the labelled recordings."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _overlaps(segment, span) -> bool:
    return segment["start_s"] < span[1] and span[0] < segment["end_s"]


def test_vad_over_the_queue_finds_speech_and_only_speech(fleet, client, data_path, labelled_files):
    gaps_file = "audio/vad/speech_with_long_gaps_16k.wav"
    pending = {path: client.analyze_audio((data_path / path).read_bytes(), {"spoof": False, "embed": False})
               for path in [gaps_file] + [p for p in labelled_files if p.startswith("audio/nonspeech/")]}
    results = {path: p.get(timeout=120) for path, p in pending.items()}
    truth = labelled_files[gaps_file]["labels"]["speech_segments_truth"]
    found = results.pop(gaps_file)["speech_segments"]
    for span in truth:
        assert any(_overlaps(s, span) for s in found), span
    gaps = [(truth[i][1] + 0.5, truth[i + 1][0] - 0.5) for i in range(len(truth) - 1)]
    assert not [s for s in found for gap in gaps if _overlaps(s, gap)]
    for path, result in results.items():
        assert result["speech_segments"] == [] and result["embedding"] is None and result["spoof"] is None, path
        assert result["no_speech_reason"]


def test_analyze_result_fields(fleet, client, data_path):
    clip = data_path / "audio" / "speakers" / "librispeech_1998_01.wav"
    result = client.analyze_audio(clip.read_bytes()).get(timeout=120)
    assert result["sample_rate_in"] == 16000 and result["duration_s"] > 1
    assert 0 < result["speech_ratio"] <= 1
    assert len(result["embedding"]) == 192
    assert set(result["spoof"]) >= {"score", "is_bonafide"}
    assert result["execution_provider"] and result["device"] and result["models"]
    assert result["timings_ms"]["total"] > 0


def test_verify_separates_speakers(fleet, client, data_path, labels):
    same = [p for p in labels["pairs"]["speaker_same"] if "librispeech" in p[0]][:3]
    different = [p for p in labels["pairs"]["speaker_different"] if "librispeech" in p[0] and "librispeech" in p[1]][:3]
    pending = [(True, client.verify_speakers((data_path / a).read_bytes(), (data_path / b).read_bytes()))
               for a, b in same]
    pending += [(False, client.verify_speakers((data_path / a).read_bytes(), (data_path / b).read_bytes()))
                for a, b in different]
    for expected, result in pending:
        answer = result.get(timeout=120)
        assert answer["same_speaker"] is expected
        assert answer["execution_provider"]
        assert all(seconds > 1 for seconds in answer["speech_s"].values())


def test_verify_without_speech_says_which_recording(fleet, client, data_path):
    speech = (data_path / "audio" / "speakers" / "librispeech_533_01.wav").read_bytes()
    silence = (data_path / "audio" / "nonspeech" / "digital_silence_3s_16k.wav").read_bytes()
    with pytest.raises(Exception) as refused:
        client.verify_speakers(silence, speech).get(timeout=120)
    assert type(refused.value).__name__ == "NoSpeechFound" and "audio_a" in str(refused.value)


def test_ident_submit_audio(fleet, fleet_env, data_path):
    clip = data_path / "bad" / "speech_8k_stereo.wav"
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "submit", str(clip)],
                               env=fleet_env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "<192 floats>" in completed.stdout and "speech_segments" in completed.stdout
