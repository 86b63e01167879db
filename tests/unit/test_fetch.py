import hashlib
import http.server
import os
import subprocess
import sys
import threading
from dataclasses import replace
from functools import partial

import pytest

from models.catalog import CATALOG
from models.fetch import fetch_one, verify
from tasks.errors import ConfigurationError, ModelUnavailable

SPEC = CATALOG["yunet_2023mar"]


def test_fetch_from_a_folder_mirror_checks_the_hash(models_path, tmp_path):
    seen = []
    path = fetch_one(SPEC, tmp_path, str(models_path), progress=lambda done, total: seen.append((done, total)))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SPEC.sha256
    assert seen[-1] == (SPEC.size_bytes, SPEC.size_bytes)
    assert [c.state for c in verify([SPEC], tmp_path)] == ["ok"]


def test_a_mismatch_keeps_nothing(models_path, tmp_path):
    wrong = replace(SPEC, sha256="0" * 64)
    with pytest.raises(ModelUnavailable, match="nothing was kept"):
        fetch_one(wrong, tmp_path, str(models_path))
    assert list(tmp_path.iterdir()) == []


def test_verify_reports_missing_and_corrupt_files(tmp_path):
    (tmp_path / SPEC.filename).write_bytes(b"not a model")
    other = CATALOG["arcface_mobilefacenet"]
    states = {c.spec.key: c.state for c in verify([SPEC, other], tmp_path)}
    assert states == {SPEC.key: "mismatch", other.key: "missing"}


def test_verify_command_names_every_file_in_full_on_an_80_column_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env.update(IDENT_MODELS_DIR=str(tmp_path), COLUMNS="80")
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "models", "verify", "--all"], env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1, completed.stderr
    assert "missing" in completed.stdout and "…" not in completed.stdout, completed.stdout


def test_fetch_from_an_http_mirror(models_path, tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(models_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        path = fetch_one(SPEC, tmp_path / "models", url)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == SPEC.sha256
        with pytest.raises(ModelUnavailable, match="cannot download"):
            fetch_one(replace(SPEC, filename="absent.onnx"), tmp_path / "models", url)
    finally:
        server.shutdown()


def test_a_models_dir_that_cannot_be_written_names_the_variable(models_path, tmp_path):
    # Under a plain file: no folder can be made there, root or not.
    (tmp_path / "a file").write_bytes(b"")
    models_dir = tmp_path / "a file" / "models"
    with pytest.raises(ConfigurationError, match="cannot write model files to .*models \\(IDENT_MODELS_DIR\\)"):
        fetch_one(SPEC, models_dir, str(models_path))


def test_fetch_command_into_a_models_dir_that_cannot_be_written(models_path, tmp_path):
    (tmp_path / "a file").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env.update(IDENT_MODELS_DIR=str(tmp_path / "a file" / "models"))
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "models", "fetch", "--from", str(models_path)],
                               env=env, capture_output=True, text=True, timeout=60)
    said = " ".join(completed.stderr.split())  # rich wraps long lines
    assert completed.returncode == 2 and "Traceback" not in said, said
    assert said.count("cannot write model files to") == 1, "one error for the folder, not one per model"
    assert "IDENT_MODELS_DIR" in said and "Not a directory" in said


def test_converted_models_need_a_mirror(tmp_path):
    with pytest.raises(ModelUnavailable, match="--from"):
        fetch_one(CATALOG["aasist"], tmp_path)


def test_unpinned_models_are_never_fetched(tmp_path):
    with pytest.raises(ModelUnavailable, match="no sha256 is pinned"):
        fetch_one(CATALOG["arcface_w600k_mbf"], tmp_path)


class _BrokenOffHandler(http.server.BaseHTTPRequestHandler):
    """Promises the whole file, sends a tenth of it, and hangs up."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(SPEC.size_bytes))
        self.end_headers()
        self.wfile.write(b"\0" * (SPEC.size_bytes // 10))
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_download_that_breaks_off_is_a_typed_error_and_keeps_nothing(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BrokenOffHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ModelUnavailable, match="broke off"):
            fetch_one(SPEC, tmp_path, f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    assert list(tmp_path.iterdir()) == []
