"""The vision worker: ``celery -A workers.vision worker -Q vision``."""

from workers.wiring import make_worker_app


def build_pipeline(sessions, specs, settings):
    import cv2

    from workers.vision.pipeline import VisionPipeline

    # OpenCV keeps a thread pool of its own, sized to every core. A pool process
    # gets the share of the cores its ONNX Runtime sessions were given: with
    # every process busy, OpenCV's extra threads only burn CPU: two processes
    # on 2 cores, 150 photos each, three interleaved rounds: 5.21-5.37 s with one
    # OpenCV thread against 5.22-5.55 s with OpenCV's default.
    cv2.setNumThreads(max(session.threads for session in sessions.values()))
    return VisionPipeline(sessions, specs, settings)


app = make_worker_app("vision", build_pipeline)
