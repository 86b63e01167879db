"""The vision worker: ``celery -A workers.vision worker -Q vision``."""

from workers.bootstrap import make_worker_app, register_pipeline


def _build_pipeline(sessions, specs, settings):
    from workers.vision.pipeline import VisionPipeline

    return VisionPipeline(sessions, specs, settings)


register_pipeline("vision", _build_pipeline)
app = make_worker_app("vision")

from workers.vision import tasks  # noqa: E402,F401 -- registers the tasks on the app
