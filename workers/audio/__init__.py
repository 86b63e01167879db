"""The audio worker: ``celery -A workers.audio worker -Q audio``."""

from workers.bootstrap import make_worker_app, register_pipeline


def _build_pipeline(sessions, specs, settings):
    from workers.audio.pipeline import AudioPipeline

    return AudioPipeline(sessions, specs, settings)


register_pipeline("audio", _build_pipeline)
app = make_worker_app("audio")

from workers.audio import tasks  # noqa: E402,F401 -- registers the tasks on the app
