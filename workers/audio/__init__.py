"""The audio worker: ``celery -A workers.audio worker -Q audio``."""

from workers.wiring import make_worker_app


def build_pipeline(sessions, specs, settings):
    from workers.audio.pipeline import AudioPipeline

    return AudioPipeline(sessions, specs, settings)


app = make_worker_app("audio", build_pipeline)
