"""Audio tasks: decode the call, run the pipeline, shape the result."""

from __future__ import annotations

from tasks import contract
from workers.audio import app
from workers.bootstrap import AnalyzeTask, FleetTask, analyze_strategy, current_runtime, options_dict


@app.task(base=AnalyzeTask, bind=True, name=contract.AUDIO_ANALYZE, payload_name="audio",
          Strategy=analyze_strategy())
def analyze(self, audio, options=None) -> dict:
    runtime = current_runtime()
    data = self.payload(audio, "audio")
    return runtime.finish(runtime.pipeline.analyze(data, options_dict(options)))


@app.task(base=FleetTask, bind=True, name=contract.AUDIO_VERIFY)
def verify(self, audio_a, audio_b) -> dict:
    runtime = current_runtime()
    first = self.payload(audio_a, "audio_a")
    second = self.payload(audio_b, "audio_b")
    return runtime.finish(runtime.pipeline.verify(first, second))


@app.task(base=FleetTask, bind=True, name=contract.AUDIO_GET_STATUS)
def get_status(self) -> dict:
    return current_runtime().status()
