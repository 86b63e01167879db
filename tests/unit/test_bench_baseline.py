"""The bench's in-process baseline: warmed like the fleet, and failing clearly when it cannot load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

RUN_BASELINE = textwrap.dedent("""
    import json, sys
    from ident.bench import load_inputs, run_baseline
    from tasks.errors import IdentError

    if __name__ == "__main__":
        try:
            calls = []
            report = run_baseline("vision", load_inputs("vision", None)[:3], 4, 2, 1, warm_jobs=3,
                                  progress=lambda n: calls.append(("timed", n)),
                                  warm_progress=lambda n: calls.append(("warm", n)))
            report["calls"] = calls
        except IdentError as exc:
            print("IdentError:", exc)
            sys.exit(3)
        print(json.dumps(report))
""")


def run_baseline_in(tmp_path: Path, models_dir: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "baseline.py"
    script.write_text(RUN_BASELINE)
    env = {**os.environ, "IDENT_MODELS_DIR": str(models_dir), "PYTHONPATH": str(REPO)}
    # A Pool whose processes fail to start can respawn them forever: the timeout is the assertion.
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_a_baseline_without_the_models_fails_with_the_reason(tmp_path, data_path):
    completed = run_baseline_in(tmp_path, tmp_path / "no-models")
    assert completed.returncode == 3, completed.stderr[-2000:]
    assert "in-process baseline runs on this machine" in completed.stdout
    assert "IDENT_MODELS_DIR" in completed.stdout


def test_a_baseline_warms_up_before_it_times(tmp_path, models_path, data_path):
    completed = run_baseline_in(tmp_path, models_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["warm_up_jobs"] == 3
    # Every warm-up job is done before the first timed one.
    assert report["calls"] == [["warm", 1]] * 3 + [["timed", 1]] * 4
    assert report["processes"] == 2 and report["throughput_per_s"] > 0


def test_the_baseline_selects_the_fleets_models_whatever_this_shell_says(monkeypatch, models_path):
    """A fleet started with other IDENT_*_MODEL settings than the bench's shell: the baseline runs the fleet's.

    The fleet's models come as model_status reports them: keyed by catalog key.
    """
    import dataclasses

    from models.catalog import selected_models, settings_selecting
    from tasks.settings import Settings

    monkeypatch.delenv("IDENT_SPOOF_MODEL", raising=False)
    here = Settings.from_env({"IDENT_MODELS_DIR": str(models_path)})
    for kind, fleet_env in (
        ("audio", {"IDENT_SPOOF_MODEL": "aasist_l"}),
        ("vision", {"IDENT_FACE_DETECTION_MODEL": "yunet_s_dynamic", "IDENT_LIVENESS_ENSEMBLE": "false"}),
        ("vision", {}),
    ):
        fleets = Settings.from_env({"IDENT_MODELS_DIR": str(models_path), **fleet_env})
        reported = sorted(spec.key for spec in selected_models(fleets, kind).values())
        baseline = dataclasses.replace(here, **settings_selecting(reported))
        assert sorted(spec.key for spec in selected_models(baseline, kind).values()) == reported, fleet_env
