"""The `ident` command's own errors: each a plain message, none a traceback, before anything is started or sent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from ident import cli, local_fleet
from ident.fleet import WorkerProcess
from tests.conftest import REPO_ROOT

NOTHING_LISTENS = "redis://127.0.0.1:1/0"


def ident(*argv: str, **ident_env: str) -> tuple[int, str]:
    """Run `ident ARGV` with only the given IDENT_* variables; (exit code, stderr with rich's wrapping undone)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env.update(ident_env)
    completed = subprocess.run([sys.executable, "-m", "ident.cli", *argv], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    said = " ".join(completed.stderr.split())
    assert "Traceback" not in said, said
    return completed.returncode, said


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not much of a photo")
    return path


@pytest.mark.parametrize(("argv", "variable", "value", "message"), [
    (("status",), "IDENT_REDIS_URL", "localhost:6379", "IDENT_REDIS_URL='localhost:6379' is not valid"),
    (("models", "verify"), "IDENT_MODELS_DIR", "~nosuchuser/models", "IDENT_MODELS_DIR='~nosuchuser/models' is not"),
    (("status",), "IDENT_MAX_WAIT_MS", "inf", "IDENT_MAX_WAIT_MS=inf is not valid"),
])
def test_a_bad_setting_is_named(argv, variable, value, message):
    code, said = ident(*argv, **{variable: value})
    assert code == 2 and f"ConfigurationError: {message}" in said


def test_files_may_follow_options_as_the_readme_shows(photo, tmp_path):
    other = tmp_path / "y.jpg"
    other.write_bytes(photo.read_bytes())
    args = cli.parse_args(["submit", str(photo), "--verify", str(other), "--timeout", "5"])
    assert (args.command, args.files, args.verify, args.timeout) == ("submit", [str(photo), str(other)], True, 5.0)
    code, said = ident("submit", str(photo), "--verify", str(other), IDENT_REDIS_URL=NOTHING_LISTENS)
    assert code == 2 and "cannot reach Redis" in said, "parsed, then sent"
    with pytest.raises(SystemExit):
        cli.parse_args(["submit", str(photo), "--no-such-option"])
    with pytest.raises(SystemExit):
        cli.parse_args(["status", "--no-such-option"])
    # After "--" a file may start with "-" (argparse's intermixed parsing loses that).
    assert cli.parse_args(["submit", "--timeout", "5", "--", "-x.jpg"]).files == ["-x.jpg"]


def test_draw_into_a_folder_that_does_not_exist_is_refused_before_sending(photo, tmp_path):
    code, said = ident("submit", str(photo), "--draw", str(tmp_path / "absent" / "out.jpg"),
                       IDENT_REDIS_URL=NOTHING_LISTENS)
    assert code == 2 and f"the folder {tmp_path / 'absent'} does not exist" in said
    assert "cannot reach Redis" not in said


def test_without_redis_the_hint_fits_how_the_url_was_given(photo, monkeypatch):
    code, said = ident("submit", str(photo), IDENT_REDIS_URL=NOTHING_LISTENS)
    assert code == 2 and "cannot reach Redis at redis://127.0.0.1:1/0" in said
    assert "Start its Redis at IDENT_REDIS_URL" in said and "start one with `ident up`" not in said
    # `ident up`'s Redis is on a free port: the default URL never reaches it.
    monkeypatch.delenv("IDENT_REDIS_URL", raising=False)
    assert "the URL it printed as \"embedded redis-server at ...\"" in cli.redis_hint()


def test_up_on_a_redis_url_where_nothing_answers_says_so_and_starts_nothing():
    started = time.monotonic()
    code, said = ident("up", IDENT_REDIS_URL=NOTHING_LISTENS)
    assert code == 2 and time.monotonic() - started < 30, "not after --ready-timeout"
    assert "nothing answers at IDENT_REDIS_URL=redis://127.0.0.1:1/0" in said
    assert "unset IDENT_REDIS_URL so that it runs an embedded one" in said and "log" not in said


def test_up_refuses_a_flower_port_another_program_holds():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, said = ident("up", "--flower", "--flower-port", str(port))
    assert code == 2 and f"Flower cannot listen on 127.0.0.1:{port}: Address already in use" in said
    assert "embedded redis-server" not in said, "refused before anything was started"


def test_a_fleet_process_that_ended_is_named_with_its_exit_code(tmp_path):
    runner = cli.LocalFleetRunner(None)
    log_path = tmp_path / "vision.log"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    try:
        runner.workers = [WorkerProcess("audio", "audio@t", alive, log_path),
                          WorkerProcess("vision", "vision@t", killed, log_path)]
        killed.wait(timeout=30)
        assert runner.first_exit() == f"worker vision@t exited with code -9 (killed by SIGKILL); see {log_path}"
        runner.workers.pop()
        assert runner.first_exit() is None
    finally:
        alive.kill()
        alive.wait()
    assert local_fleet.exit_status(3) == "exited with code 3"
