"""The README's main command and `ident up`: embedded Redis, both workers, clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from ident.fleet import free_port

pytestmark = pytest.mark.integration


# The fleet's data folder (the demo's embedded PostgreSQL) for this module, never the user's own.
DATA_DIR = tempfile.mkdtemp(prefix="ident-data-")


def _env(models_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env["IDENT_MODELS_DIR"] = str(models_path)
    env["IDENT_DATA_DIR"] = DATA_DIR
    return env


def _descendants_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_demo_runs_samples_on_an_embedded_redis(models_path):
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "demo"], env=_env(models_path),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "embedded redis-server" in completed.stderr
    assert "vision.get_status: device=" in completed.stdout and "audio.get_status: device=" in completed.stdout
    assert completed.stdout.count('"execution_provider"') >= 4
    assert "<128 floats>" in completed.stdout
    # The summary table names each job's provider in full, even 80 columns wide.
    assert len(re.findall(r"│ (?:CUDA|CPU)ExecutionProvider +│", completed.stdout)) == 4, completed.stdout[-2000:]
    # The galleries on the embedded PostgreSQL: each enrolled subject found again, each stranger not.
    gallery_rows = completed.stdout[completed.stdout.index("enrol, identify, forget"):]
    assert "match barack_obama" in gallery_rows and "match librispeech_1688" in gallery_rows, gallery_rows
    assert gallery_rows.count("stranger") == 2, gallery_rows
    assert gallery_rows.count("1 deleted") == 2
    from galleries import embedded

    assert embedded.running_pid(DATA_DIR) is None, "the demo stops the embedded PostgreSQL it started"


def _up_until_ready(models_path, *options: str, ignore_sighup: bool = False) -> tuple[subprocess.Popen, str]:
    """`ident up OPTIONS` started and waited for; (the process, what it wrote to stderr until then)."""
    # As nohup starts it: SIGHUP ignored from the start.
    ignore = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_sighup else None
    up = subprocess.Popen([sys.executable, "-m", "ident.cli", "up", *options], env=_env(models_path),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = up.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            return up, "".join(lines)
    up.kill()
    raise AssertionError("".join(lines))


def _gone(processes: list[psutil.Process]) -> bool:
    time.sleep(1)
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_up_stops_everything_and_exits_1_when_a_worker_dies(models_path):
    up, _ = _up_until_ready(models_path)
    try:
        started = _descendants_of(up.pid)
        (vision,) = [p for p in psutil.Process(up.pid).children() if "workers.vision" in p.cmdline()]
        vision.kill()
        assert up.wait(timeout=90) == 1
        said = " ".join(up.stderr.read().split())
        assert "worker vision@local exited with code -9 (killed by SIGKILL); see " in said
        assert _gone(started), "the other worker, the dead one's pool and redis-server are stopped too"
    finally:
        if up.poll() is None:
            up.kill()


def test_up_stops_everything_on_sighup(models_path):
    up, _ = _up_until_ready(models_path)
    try:
        started = _descendants_of(up.pid)
        up.send_signal(signal.SIGHUP)
        assert up.wait(timeout=90) == 0
        assert _gone(started), "nothing is left orphaned when the terminal closes"
    finally:
        if up.poll() is None:
            up.kill()


def test_up_under_nohup_outlives_sighup(models_path):
    """`nohup ident up &`: SIGHUP was ignored on purpose and stays ignored; SIGTERM still stops it all."""
    up, _ = _up_until_ready(models_path, ignore_sighup=True)
    try:
        started = _descendants_of(up.pid)
        up.send_signal(signal.SIGHUP)
        time.sleep(5)  # a stop would have ended the workers by now
        assert up.poll() is None and all(p.is_running() for p in started), "SIGHUP was ignored, as nohup asked"
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        assert _gone(started)
    finally:
        if up.poll() is None:
            up.kill()


def test_up_stops_everything_on_ctrl_c(models_path):
    port = free_port()
    up, said = _up_until_ready(models_path, "--flower", "--flower-port", str(port), "--flower-auth", "ops")
    try:
        password = re.search(r"password (\S+)\)", said).group(1)
        assert len(password) >= 12, "no password given, so a random one is made"
        started = _descendants_of(up.pid)
        assert len(started) >= 4, "redis-server, two workers with their pools, Flower"
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
        assert _gone(started)
    finally:
        if up.poll() is None:
            up.kill()


@pytest.mark.parametrize("seconds_after_status", [0.0, 0.5, 1.5])
def test_demo_stopped_by_sigterm_leaves_nothing_running(models_path, seconds_after_status):
    """SIGTERM at any point, even while the demo is already stopping its fleet, stops it all."""
    demo = subprocess.Popen([sys.executable, "-m", "ident.cli", "demo"], env=_env(models_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "the demo ended before its status calls"
            if "status calls" in line:
                break
        started = _descendants_of(demo.pid)
        time.sleep(seconds_after_status)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=90) in (0, 130)
        assert _gone(started), "no worker or redis-server is left running"
    finally:
        if demo.poll() is None:
            demo.kill()
