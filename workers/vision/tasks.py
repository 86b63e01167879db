"""Vision tasks: decode the call, run the pipeline, shape the result."""

from __future__ import annotations

from tasks import contract
from workers.bootstrap import DeliveryCountedTask, current_runtime, options_dict, payload_bytes
from workers.vision import app


@app.task(base=DeliveryCountedTask, name=contract.VISION_ANALYZE)
def analyze(image, options=None) -> dict:
    runtime = current_runtime()
    data = payload_bytes(image, "image", runtime.settings)
    return runtime.finish(runtime.pipeline.analyze(data, options_dict(options)))


@app.task(base=DeliveryCountedTask, name=contract.VISION_VERIFY)
def verify(image_a, image_b) -> dict:
    runtime = current_runtime()
    first = payload_bytes(image_a, "image_a", runtime.settings)
    second = payload_bytes(image_b, "image_b", runtime.settings)
    return runtime.finish(runtime.pipeline.verify(first, second))


@app.task(base=DeliveryCountedTask, name=contract.VISION_GET_STATUS)
def get_status() -> dict:
    return current_runtime().status()
