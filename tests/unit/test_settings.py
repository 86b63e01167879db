import re
from dataclasses import fields
from pathlib import Path

import pytest

from tasks.errors import ConfigurationError
from tasks.settings import Settings, env_name

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
