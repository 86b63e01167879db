"""`ident serve`: its options, and the clean interpreter it runs the gateway in."""

from __future__ import annotations

import sys

from ident import cli, serve


def test_ident_serve_parses_host_and_port():
    args = cli.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.host, args.port, args.func) == ("0.0.0.0", 9000, serve.run_from_cli)


def test_it_runs_itself_as_python_m_ident_serve_so_the_cli_imports_stay_out():
    args = cli.parse_args(["serve", "--port", "9000"])
    assert serve.exec_argv(args) == [sys.executable, "-m", "ident.serve", "--log-level", "info", "--port", "9000"]
    assert serve.exec_argv(cli.parse_args(["serve"]))[-2:] == ["--log-level", "info"]


def test_no_key_is_a_clear_error(monkeypatch, capsys):
    for name in ("IDENT_API_KEYS", "IDENT_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert serve.main(["--port", "18080"]) == 2
    assert "IDENT_API_KEYS" in capsys.readouterr().err
