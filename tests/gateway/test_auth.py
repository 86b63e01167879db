"""API keys: plain or as a file of sha256 digests, Bearer parsing, and what a caller is known by."""

from __future__ import annotations

import hashlib

import pytest

from gateway.auth import KeyRing, key_digest, read_key_file
from tasks.errors import ConfigurationError
from tasks.settings import Settings

KEY_A = "a" * 32
KEY_B = "b-key-0123456789abcdef"


def ring(**env) -> KeyRing:
    return KeyRing.from_settings(Settings.from_env(env))


def test_a_caller_is_known_by_its_keys_digest_never_by_the_key():
    keys = ring(IDENT_API_KEYS=f"{KEY_A}, {KEY_B}")
    assert keys.caller(f"Bearer {KEY_A}") == hashlib.sha256(KEY_A.encode()).hexdigest()
    assert keys.caller(f"bearer   {KEY_B} ") == key_digest(KEY_B)
    assert len(keys) == 2


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", f"Basic {KEY_A}", f"Bearer {KEY_A}x",
                                    f"Bearer {KEY_A[:-1]}", KEY_A, "Bearer a"])
def test_anything_but_an_accepted_bearer_key_is_nobody(header):
    assert ring(IDENT_API_KEYS=KEY_A).caller(header) is None


def test_a_file_of_digests_with_comments(tmp_path):
    path = tmp_path / "keys.sha256"
    path.write_text(f"# issued 2024-05\n{key_digest(KEY_A)}  # service A\n\n{key_digest(KEY_B).upper()}\n")
    keys = ring(IDENT_API_KEYS_FILE=str(path))
    assert keys.caller(f"Bearer {KEY_A}") == key_digest(KEY_A)
    assert keys.caller(f"Bearer {KEY_B}") == key_digest(KEY_B)
    # Keys and a file together: both are accepted.
    both = ring(IDENT_API_KEYS="c" * 20, IDENT_API_KEYS_FILE=str(path))
    assert both.caller("Bearer " + "c" * 20) and both.caller(f"Bearer {KEY_A}")


def test_a_file_that_holds_a_key_instead_of_its_digest_is_refused_without_quoting_it(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{KEY_B}\n")
    with pytest.raises(ConfigurationError, match="line 1: not a sha256 hex digest") as caught:
        read_key_file(path)
    assert KEY_B not in str(caught.value)


def test_a_missing_file_says_which(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot be read"):
        ring(IDENT_API_KEYS_FILE=str(tmp_path / "absent"))


def test_no_key_at_all_is_refused_with_the_way_to_make_one():
    with pytest.raises(ConfigurationError, match="openssl rand -hex 32"):
        ring()


def test_keys_stay_out_of_the_settings_repr():
    assert KEY_A not in repr(Settings.from_env({"IDENT_API_KEYS": KEY_A}))
