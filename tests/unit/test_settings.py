import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_type_hints

import pytest

from tasks.errors import ConfigurationError
from tasks.settings import Settings, _field_parsers, env_name

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults():
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.device == "auto"
    assert settings.visibility_timeout > settings.task_time_limit
    assert settings.warnings() == []


def test_environment_overrides():
    settings = Settings.from_env(
        {
            "IDENT_REDIS_URL": "redis://:secret@redis:6379/1",
            "IDENT_DEVICE": "CUDA",
            "IDENT_GPU_IDS": "0, 1",
            "IDENT_MODELS_DIR": "/models",
            "IDENT_LIVENESS_ENSEMBLE": "false",
            "IDENT_FACE_MATCH_THRESHOLD": "0.4",
            "IDENT_MAX_AUDIO_SECONDS": "30",
        }
    )
    assert settings.device == "cuda"
    assert settings.gpu_ids == (0, 1)
    assert settings.models_dir == Path("/models")
    assert settings.liveness_ensemble is False
    assert settings.face_match_threshold == 0.4
    assert settings.max_audio_seconds == 30.0


@pytest.mark.parametrize(
    "env, message",
    [
        ({"IDENT_DEVICE": "gpu"}, "IDENT_DEVICE='gpu'"),
        ({"IDENT_GPU_IDS": "zero"}, "IDENT_GPU_IDS='zero'"),
        ({"IDENT_MAX_PIXELS": "0"}, "IDENT_MAX_PIXELS must be at least 1"),
        ({"IDENT_TASK_SOFT_TIME_LIMIT": "300"}, "IDENT_TASK_SOFT_TIME_LIMIT must be below"),
        ({"IDENT_LIVENESS_ENSEMBLE": "maybe"}, "IDENT_LIVENESS_ENSEMBLE"),
        # Values that parse but cannot work: results with no expiry, verdicts that are always False.
        ({"IDENT_RESULT_EXPIRES": "0"}, "IDENT_RESULT_EXPIRES must be at least 1"),
        ({"IDENT_FACE_MATCH_THRESHOLD": "nan"}, "IDENT_FACE_MATCH_THRESHOLD=nan is not valid"),
        ({"IDENT_LIVENESS_THRESHOLD": "1.5"}, "IDENT_LIVENESS_THRESHOLD=1.5 is not valid"),
        ({"IDENT_SPOOF_THRESHOLD": "-inf"}, "IDENT_SPOOF_THRESHOLD=-inf is not valid"),
        ({"IDENT_CPU_THREADS": "-2"}, "IDENT_CPU_THREADS must be 0 or more"),
        ({"IDENT_MAX_WAIT_MS": "-5"}, "IDENT_MAX_WAIT_MS must be 0 or more"),
        ({"IDENT_MAX_AUDIO_SECONDS": "nan"}, "IDENT_MAX_AUDIO_SECONDS must be a positive number"),
        ({"IDENT_GPU_IDS": "0,-1"}, "IDENT_GPU_IDS=.* negative"),
        # Celery would fail on these later, with an AttributeError or a ModuleNotFoundError.
        ({"IDENT_REDIS_URL": "localhost:6379"}, "IDENT_REDIS_URL='localhost:6379' is not valid: it must be a redis://"),
        ({"IDENT_REDIS_URL": "unix:///run/redis.sock"}, "IDENT_REDIS_URL='unix:///run/redis.sock' is not valid"),
        ({"IDENT_REDIS_URL": "redis://redis:63790000/0"}, "its port is not a number"),
        ({"IDENT_REDIS_URL": "redis://redis/queue"}, "the database after the host must be a number"),
        # inf would hold a batch's first job forever.
        ({"IDENT_MAX_WAIT_MS": "inf"}, "IDENT_MAX_WAIT_MS=inf is not valid: it must be a finite number"),
        ({"IDENT_MAX_WAIT_MS": "120000"}, "below IDENT_TASK_SOFT_TIME_LIMIT"),
        ({"IDENT_MODELS_DIR": "~nosuchuser/x"}, "IDENT_MODELS_DIR='~nosuchuser/x' is not valid: ~nosuchuser names no"),
        ({"IDENT_DATA_DIR": "~nosuchuser"}, "IDENT_DATA_DIR='~nosuchuser' is not valid"),
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


def test_a_bad_redis_url_is_shown_with_an_example_and_without_its_password():
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"IDENT_REDIS_URL": "http://:hunter2@redis:6379/0"})
    assert "hunter2" not in str(raised.value) and "http://**@redis:6379/0" in str(raised.value)
    assert "redis://127.0.0.1:6379/0" in str(raised.value)
    # A base64-style password holds "/", which must be percent-encoded: none of it is shown.
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"IDENT_REDIS_URL": "redis://:Xk9/s3cret#PW+q@redis:6379/0"})
    assert "s3cret" not in str(raised.value) and "Xk9" not in str(raised.value)
    assert "redis://**@redis:6379/0" in str(raised.value) and "percent-encoded" in str(raised.value)


@pytest.mark.parametrize("url", ["redis://", "redis:///0", "redis://:pw@/0", "redis://:6380/0", "redis://localhost",
                                 "redis://[::1]:6379/0", "rediss://h:6380/0?ssl_cert_reqs=required",
                                 "redis://:p%2Fw@redis:6379/0"])
def test_redis_urls_that_celery_takes_are_taken(url):
    """No host means localhost to redis-py and kombu."""
    assert Settings.from_env({"IDENT_REDIS_URL": url}).redis_url == url


def test_an_empty_redis_url_is_unset_as_for_ident_up():
    assert Settings.from_env({"IDENT_REDIS_URL": ""}).redis_url == "redis://127.0.0.1:6379/0"
    assert Settings.from_env({"IDENT_REDIS_URL": " "}).redis_url == "redis://127.0.0.1:6379/0"
    assert Settings.from_env({"IDENT_REDIS_URL": "rediss://:pw@redis:6380/2"}).redis_url == "rediss://:pw@redis:6380/2"


def test_short_visibility_timeout_is_allowed_with_a_warning():
    settings = Settings.from_env({"IDENT_VISIBILITY_TIMEOUT": "15"})
    assert settings.visibility_timeout == 15
    assert "handed to a second worker" in settings.warnings()[0]


def test_the_readme_documents_every_variable_and_no_other():
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(IDENT_[A-Z0-9_]+)`", section))
    read = {env_name(f.name) for f in fields(Settings)}
    assert read - documented == set(), "read from the environment but not in the README's table"
    assert documented - read == set(), "in the README's table but read by nothing"


def _as_text(value):
    """The text an operator would write for ``value`` in an ``IDENT_*`` variable."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, (int, float, str, Path)):
        return str(value)
    raise AssertionError(f"no text form for {value!r}: teach _as_text the new field type")


def test_every_field_is_parsed_from_the_environment_by_its_declared_type():
    defaults = Settings.from_env({})
    hints = get_type_hints(Settings)
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        parsed = getattr(Settings.from_env({env_name(f.name): _as_text(default)}), f.name)
        assert parsed == default, f.name
        assert type(parsed) is type(default), f.name
        if hints[f.name] in (tuple[int, ...], tuple[str, ...]):
            assert all(type(item) is hints[f.name].__args__[0] for item in parsed), f.name
    # All at once, as a deployment's environment gives them.
    assert Settings.from_env({env_name(f.name): _as_text(getattr(defaults, f.name)) for f in fields(Settings)}) == defaults


def test_a_field_of_a_type_that_no_parser_reads_fails_loudly():
    @dataclass(frozen=True)
    class Odd:
        ratio: complex = 0j

    with pytest.raises(TypeError, match="'ratio' is declared <class 'complex'>"):
        _field_parsers(Odd)


@pytest.mark.parametrize(
    "name, raw, reason",
    [
        ("IDENT_GPU_IDS", "0,x", "invalid literal for int() with base 10: 'x'"),
        ("IDENT_CUDA_TF32", "maybe", "expected true/false, got 'maybe'"),
        ("IDENT_SPOOF_THRESHOLD", "high", "could not convert string to float: 'high'"),
    ],
)
def test_a_value_its_type_cannot_parse_names_the_variable(name, raw, reason):
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({name: raw})
    assert str(raised.value) == f"{name}={raw!r} is not valid: {reason}"
