"""``ident serve``: the HTTP gateway (gateway/) on uvicorn.

``ident serve`` re-executes itself as ``python -m ident.serve`` (same pid,
fresh interpreter), so that the ``ident`` command's own imports (the doctor's
model catalog, workers.formats) never load in the gateway process, which must
stay free of the workers and the models (docs/gateway.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tasks.errors import IdentError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default: IDENT_GATEWAY_HOST, 127.0.0.1; "
                                       "0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, help="TCP port (default: IDENT_GATEWAY_PORT, 8080)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: info)")


def exec_argv(args: argparse.Namespace) -> list[str]:
    """The command line ``ident serve`` runs itself as."""
    argv = [sys.executable, "-m", "ident.serve", "--log-level", args.log_level]
    if args.host is not None:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    return argv


def run_from_cli(args: argparse.Namespace) -> int:
    argv = exec_argv(args)
    os.execv(argv[0], argv)
    return 0  # not reached: execv replaces this process


def serve(host: str | None, port: int | None, log_level: str = "info") -> int:
    import dataclasses

    import uvicorn

    from gateway.app import make_gateway
    from tasks.settings import load_settings

    settings = load_settings()
    if host is not None or port is not None:
        settings = dataclasses.replace(settings, gateway_host=host or settings.gateway_host,
                                       gateway_port=settings.gateway_port if port is None else port)
        settings.validate()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_gateway(settings)
    # One process per container or host: replicas scale out behind a load balancer and share
    # their rate limits and job records through Redis.
    uvicorn.run(app, host=settings.gateway_host, port=settings.gateway_port, log_level=log_level,
                proxy_headers=True, server_header=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ident serve", description="the HTTP gateway in front of the fleet")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args.host, args.port, args.log_level)
    except IdentError as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
