"""Audio tasks: decode the call, run the pipeline, shape the result."""

from __future__ import annotations

from tasks import contract
from workers.audio import app
from workers.bootstrap import DeliveryCountedTask, current_runtime, options_dict, payload_bytes


@app.task(base=DeliveryCountedTask, name=contract.AUDIO_ANALYZE)
def analyze(audio, options=None) -> dict:
    runtime = current_runtime()
    data = payload_bytes(audio, "audio", runtime.settings)
    return runtime.finish(runtime.pipeline.analyze(data, options_dict(options)))


@app.task(base=DeliveryCountedTask, name=contract.AUDIO_VERIFY)
def verify(audio_a, audio_b) -> dict:
    runtime = current_runtime()
    first = payload_bytes(audio_a, "audio_a", runtime.settings)
    second = payload_bytes(audio_b, "audio_b", runtime.settings)
    return runtime.finish(runtime.pipeline.verify(first, second))


@app.task(base=DeliveryCountedTask, name=contract.AUDIO_GET_STATUS)
def get_status() -> dict:
    return current_runtime().status()
