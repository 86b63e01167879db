"""Vision tasks: decode the call, run the pipeline, shape the result."""

from __future__ import annotations

from tasks import contract
from workers.bootstrap import AnalyzeTask, FleetTask, analyze_strategy, current_runtime, options_dict
from workers.vision import app


@app.task(base=AnalyzeTask, bind=True, name=contract.VISION_ANALYZE, payload_name="image",
          Strategy=analyze_strategy())
def analyze(self, image, options=None) -> dict:
    runtime = current_runtime()
    data = self.payload(image, "image")
    return runtime.finish(runtime.pipeline.analyze(data, options_dict(options)))


@app.task(base=FleetTask, bind=True, name=contract.VISION_VERIFY)
def verify(self, image_a, image_b) -> dict:
    runtime = current_runtime()
    first = self.payload(image_a, "image_a")
    second = self.payload(image_b, "image_b")
    return runtime.finish(runtime.pipeline.verify(first, second))


@app.task(base=FleetTask, bind=True, name=contract.VISION_GET_STATUS)
def get_status(self) -> dict:
    return current_runtime().status()
