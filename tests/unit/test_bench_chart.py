"""`ident bench --chart`: against jobs in flight, or against batch size across saved reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ident.bench import chart_axis, load_reports
from tasks.errors import IdentError


def report(kind="vision", concurrency=16, batch=1, fleet=40.0, baseline=50.0):
    return {"kind": kind, "settings": {"concurrency": concurrency, "batch": batch},
            "throughput_per_s": fleet, "baseline_per_s": baseline,
            "latency_ms": {"p50": 300.0, "p95": 350.0, "p99": 370.0}}


def test_the_axis_is_what_the_reports_differ_in():
    assert chart_axis([report(concurrency=c) for c in (1, 4, 8)])[0] == "concurrency"
    assert chart_axis([report(batch=b) for b in (1, 8)]) == ("batch", "jobs per batch (IDENT_MAX_BATCH)")
    assert chart_axis([report()])[0] == "concurrency"
    with pytest.raises(IdentError, match="both jobs in flight and batch size"):
        chart_axis([report(concurrency=8, batch=1), report(concurrency=16, batch=8)])
    with pytest.raises(IdentError, match="nothing to put on the x-axis"):
        chart_axis([report(), report(fleet=30.0)])


def test_saved_reports_are_read_whole_or_as_lists_and_of_one_kind(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(report(batch=8)))
    (tmp_path / "sweep.json").write_text(json.dumps([report(concurrency=c) for c in (1, 2)]))
    (tmp_path / "audio.json").write_text(json.dumps(report(kind="audio")))
    assert len(load_reports("vision", [tmp_path / "one.json", tmp_path / "sweep.json"])) == 3
    with pytest.raises(IdentError, match="mixes kinds: audio"):
        load_reports("vision", [tmp_path / "one.json", tmp_path / "audio.json"])
    with pytest.raises(IdentError, match="cannot read the report"):
        load_reports("vision", [tmp_path / "missing.json"])
    # Another command's JSON, such as ident status --json, is refused by name, not with a traceback.
    (tmp_path / "status.json").write_text(json.dumps([{"vision-1@host": {"processes": []}}]))
    with pytest.raises(IdentError, match="status.json is not a report saved by ident bench --json"):
        load_reports("vision", [tmp_path / "status.json"])
    partial = report()
    del partial["latency_ms"]["p99"]
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(IdentError, match="partial.json is not a report"):
        load_reports("vision", [tmp_path / "partial.json"])


def test_chart_from_saved_reports_of_two_batch_sizes(tmp_path):
    paths = []
    for batch, fleet in ((8, 47.0), (1, 50.0)):
        paths.append(tmp_path / f"batch{batch}.json")
        paths[-1].write_text(json.dumps(report(batch=batch, fleet=fleet)))
    png = tmp_path / "batch.png"
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "bench", "--kind", "vision", "--chart", str(png),
                                "--chart-from", *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000


def test_chart_from_without_chart_is_refused(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(report()))
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "bench", "--kind", "vision",
                                "--chart-from", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "give --chart OUT.png" in completed.stderr
