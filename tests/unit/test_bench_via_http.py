"""`ident bench --via http`: its options, and the refusals made before anything is contacted."""

from __future__ import annotations

import argparse

import pytest

from ident import http_bench
from ident.bench import add_arguments
from ident.cli import cmd_bench as run
from tasks.errors import IdentError
from tasks.settings import Settings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ident bench", exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_celery_is_the_default_way():
    args = parse("--kind", "vision")
    assert (args.via, args.gateway_url, args.api_key) == ("celery", None, None)


def test_via_http_takes_a_url_and_a_key():
    args = parse("--kind", "audio", "--via", "http", "--gateway-url", "http://gw:9000/", "--api-key", "k" * 20)
    assert (args.via, args.gateway_url, args.api_key) == ("http", "http://gw:9000/", "k" * 20)
    assert http_bench.gateway_target(args.gateway_url, args.api_key, Settings()) == ("http://gw:9000", "k" * 20)


def test_via_must_be_celery_or_http():
    with pytest.raises(argparse.ArgumentError):
        parse("--kind", "vision", "--via", "grpc")


def test_the_url_and_key_default_to_the_settings():
    settings = Settings.from_env({"IDENT_GATEWAY_HOST": "0.0.0.0", "IDENT_GATEWAY_PORT": "9100",
                                  "IDENT_API_KEYS": "first-key-0123456789,second-key-0123456789"})
    assert http_bench.gateway_target(None, None, settings) == ("http://127.0.0.1:9100", "first-key-0123456789")


def test_no_key_anywhere_is_refused():
    with pytest.raises(IdentError, match="--api-key"):
        http_bench.gateway_target(None, None, Settings())


def test_a_url_that_is_not_http_is_refused():
    with pytest.raises(IdentError, match="http://"):
        http_bench.gateway_target("gw:8080", "k" * 20, Settings())


@pytest.mark.parametrize("argv, message", [
    (("--kind", "queue", "--via", "http"), "--kind vision or audio"),
    (("--kind", "vision", "--via", "http", "--batch", "4"), "--batch"),
    (("--kind", "vision", "--via", "http", "--inline"), "--inline"),
    (("--kind", "vision", "--gateway-url", "http://gw:8080"), "go with --via http"),
    (("--kind", "vision", "--api-key", "k" * 20), "go with --via http"),
])
def test_refused_before_anything_is_contacted(argv, message):
    with pytest.raises(IdentError, match=message):
        run(parse(*argv))
