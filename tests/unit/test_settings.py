from pathlib import Path

import pytest

from tasks.errors import ConfigurationError
from tasks.settings import Settings


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
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


def test_short_visibility_timeout_is_allowed_with_a_warning():
    settings = Settings.from_env({"IDENT_VISIBILITY_TIMEOUT": "15"})
    assert settings.visibility_timeout == 15
    assert "handed to a second worker" in settings.warnings()[0]
