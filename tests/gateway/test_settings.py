"""The gateway's IDENT_* settings and their checks."""

from __future__ import annotations

import pytest

from tasks.errors import ConfigurationError
from tasks.settings import Settings


def test_defaults():
    settings = Settings()
    assert (settings.api_keys, settings.api_keys_file, settings.api_rate_limit) == ((), "", "50/second")
    assert (settings.gateway_host, settings.gateway_port, settings.gateway_wait_s) == ("127.0.0.1", 8080, 30.0)


def test_parsed_from_the_environment():
    settings = Settings.from_env({"IDENT_API_KEYS": "k" * 16 + ", " + "j" * 16, "IDENT_API_RATE_LIMIT": " 1000/minute;20 per second ",
                                  "IDENT_GATEWAY_PORT": "9000", "IDENT_GATEWAY_WAIT_S": "2.5", "IDENT_API_RATE_LIMIT_X": "x"})
    assert settings.api_keys == ("k" * 16, "j" * 16)
    assert settings.api_rate_limit == "1000/minute;20 per second"
    assert (settings.gateway_port, settings.gateway_wait_s) == (9000, 2.5)


def test_an_empty_rate_limit_is_no_limit():
    assert Settings.from_env({"IDENT_API_RATE_LIMIT": ""}).api_rate_limit == ""


@pytest.mark.parametrize("env, message", [
    ({"IDENT_API_KEYS": "short"}, "key number 1 is shorter than 16"),
    ({"IDENT_API_KEYS": "k" * 20 + ",has a space in it!"}, "key number 2"),
    ({"IDENT_API_RATE_LIMIT": "fast"}, "'fast' is not a rate such as 50/second"),
    ({"IDENT_API_RATE_LIMIT": "10/second;often"}, "'often'"),
    ({"IDENT_GATEWAY_PORT": "0"}, "IDENT_GATEWAY_PORT=0 is not valid"),
    ({"IDENT_GATEWAY_PORT": "70000"}, "from 1 to 65535"),
    ({"IDENT_GATEWAY_HOST": " "}, "IDENT_GATEWAY_HOST is empty"),
    ({"IDENT_GATEWAY_WAIT_S": "0"}, "IDENT_GATEWAY_WAIT_S=0.0 is not valid"),
    ({"IDENT_GATEWAY_WAIT_S": "inf"}, "positive number"),
])
def test_bad_values_are_refused_with_what_to_do(env, message):
    with pytest.raises(ConfigurationError, match=message) as caught:
        Settings.from_env(env)
    assert "has a space" not in str(caught.value)  # a key is never quoted
