"""`ident bench --kind gallery` runs end to end on a small gallery, reports sane figures, and leaves nothing behind.

Speed itself is measured in docs/benchmarks.md ("Galleries"), not asserted here:
the run is small (3000 templates, 40 probes) so that it takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.integration

TEMPLATES = 3000
SWEEP = [10, 40]
HEADLINE = ("templates", "recall_at_1", "search_ms_p50", "search_ms_p99", "enroll_per_s", "index_build_s",
            "db_bytes")


def _env() -> dict:
    # No IDENT_GALLERY_URL: the bench starts an embedded PostgreSQL of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _bench(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ident.cli", "bench", "--kind", "gallery", *argv],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def _servers_under(folder) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        if process.info["name"] == "postgres" and str(folder) in " ".join(process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found


def test_a_small_gallery_is_loaded_indexed_searched_and_removed(tmp_path):
    data_dir = tmp_path / "pg"  # not there yet: the bench creates it, so it removes it
    report_path = tmp_path / "gallery.json"
    completed = _bench("--templates", str(TEMPLATES), "--probes", "40", "--exact-probes", "10",
                       "--ef-sweep", ",".join(map(str, SWEEP)), "--ef-search", "40",
                       "--data-dir", str(data_dir), "--json", str(report_path))
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())

    missing = [key for key in (*HEADLINE, "ef_sweep", "exact", "exact_crossover", "machine", "database", "command")
               if key not in report]
    assert not missing, f"the report lacks {missing}"
    assert report["templates"] == TEMPLATES
    assert 0.0 <= report["recall_at_1"] <= 1.0
    assert 0.0 < report["search_ms_p50"] <= report["search_ms_p99"]
    assert report["enroll_per_s"] > 0 and report["index_build_s"] > 0
    assert report["db_bytes"] > 0
    sizes = report["sizes"]
    # pg_total_relation_size is the heap (with TOAST) plus every index, the HNSW one among them.
    assert sizes["table_bytes"] + sizes["indexes_bytes"] == report["db_bytes"]
    assert 0 < sizes["hnsw_bytes"] < sizes["indexes_bytes"]

    # The sweep holds exactly the values asked for, the headline ef_search among them, in order.
    assert [row["ef_search"] for row in report["ef_sweep"]] == SWEEP
    hnsw = next(row for row in report["ef_sweep"] if row["ef_search"] == 40)
    assert (hnsw["recall_at_1"], hnsw["search_ms_p99"]) == (report["hnsw"]["recall_at_1"],
                                                            report["hnsw"]["search_ms_p99"])
    for row in report["ef_sweep"]:
        assert 0.0 <= row["recall_at_1"] <= 1.0 and row["search_ms_p50"] <= row["search_ms_p99"]
    # A genuine probe's nearest template is its own subject's by a wide margin: a bench
    # that mislabelled subjects or scored the wrong probes would miss nearly all of them.
    assert hnsw["recall_genuine"] >= 0.9

    # The headline is the shortlist's: a copy of every template, whose named rows are scored
    # exactly, finds the exact top subject of a gallery this small for every probe.
    shortlist = report["shortlist"]
    assert report["search"] == "shortlist" and report["recall_at_1"] == shortlist["recall_at_1"] == 1.0
    assert (report["search_ms_p50"], report["search_ms_p99"]) == (shortlist["search_ms_p50"],
                                                                  shortlist["search_ms_p99"])
    assert shortlist["templates"] == TEMPLATES and shortlist["bytes"] == TEMPLATES * (128 // 4 + 8)
    assert report["shortlist_build_s"] == shortlist["build_s"] > 0

    # Exact search is timed at each ladder size up to the gallery's, and the database's
    # exact answer is the one numpy computed for recall.
    assert [point["templates"] for point in report["exact"]] == [1000, 2000, TEMPLATES]
    assert all(point["agrees_with_numpy"] == 1.0 for point in report["exact"])
    assert report["exact_ms_p99"] == report["exact"][-1]["search_ms_p99"]

    identities = report["identities"]
    assert identities["subjects"] == TEMPLATES // 2 and identities["probes"] == 40
    assert identities["measured"]["genuine_mean"] == pytest.approx(0.62, abs=0.02)
    assert identities["measured"]["impostor_mean"] == pytest.approx(0.0, abs=0.02)
    assert report["database"]["pgvector"] and report["database"]["server"].startswith("embedded")
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert f"--templates {TEMPLATES}" in report["command"]
    assert "HNSW alone at ef_search 40" in completed.stdout and "through the shortlist" in completed.stdout

    assert not data_dir.exists(), "the folder the bench created is removed"
    assert not _servers_under(data_dir), "the server the bench started is stopped"


def test_options_of_other_kinds_are_refused_before_anything_starts(tmp_path):
    completed = _bench("--jobs", "5", "--concurrency", "4", "--data-dir", str(tmp_path / "pg"), timeout=60)
    assert completed.returncode == 2
    said = " ".join(completed.stderr.split())
    assert "--kind gallery does not take --concurrency, --jobs" in said
    assert not (tmp_path / "pg").exists()


def test_gallery_options_are_refused_by_other_kinds():
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "bench", "--kind", "vision", "--templates", "9"],
                               env=_env(), capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "--templates is an option of --kind gallery, not of --kind vision" in " ".join(completed.stderr.split())
