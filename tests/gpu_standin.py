"""Test only: a GPU that fails the way real ones do, for hosts without one.

Only the GPU is stood in. ``FailingGpu.install`` replaces
``onnxruntime.InferenceSession`` so that a session asked for the CUDA
execution provider is the real CPU session underneath, reporting CUDA as ORT
does, and raising a recorded ORT error (``tests/ops/fixtures/ort_cuda_errors.json``,
with ORT's own exception class) at the chosen stage: while the session is
created, on its first run (the worker's warm-up) or from its Nth run on. Like
a real broken GPU it keeps failing once it has failed. Sessions asked for the
CPU alone are untouched, so everything after the fallback is real.

``cuda_host_facts`` are the facts ``models.cuda.probe_cuda`` records on a
working GPU host, so that the worker plans CUDA at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from models.cuda import CPU_EP, CUDA_EP, CudaFacts

ERRORS_FILE = Path(__file__).resolve().parent / "ops" / "fixtures" / "ort_cuda_errors.json"
# How a worker process is told which failure to stage: STAGE:KIND[:MODEL_FILE_SUBSTRING],
# STAGE being create, warmup or runN.
ENV_VAR = "IDENT_TEST_GPU_FAILURE"
REAL_SESSION = ort.InferenceSession


def recorded_errors() -> list[dict]:
    return json.loads(ERRORS_FILE.read_text())["errors"]


def recorded_error(kind: str, stage: str | None = None) -> dict:
    """The recorded error of ``kind``, preferring one seen at ``stage`` (create or run), the newest format last."""
    found = [entry for entry in recorded_errors() if entry["kind"] == kind]
    if not found:
        raise KeyError(f"no recorded ORT error of kind {kind!r} in {ERRORS_FILE}")
    return ([entry for entry in found if entry["stage"] == stage] or found)[-1]


def ort_exception(kind: str, stage: str | None = None) -> Exception:
    """The recorded error as ORT raises it: its own exception class (or Python's RuntimeError) and message."""
    entry = recorded_error(kind, stage)
    name = entry["exception"].rsplit(".", 1)[-1]
    cls = RuntimeError if name == "RuntimeError" else getattr(ort_errors, name)
    return cls(entry["message"])


def cuda_host_facts(cc: tuple[int, int] = (9, 0), **overrides) -> CudaFacts:
    """What probe_cuda records on a GPU host whose driver, libraries and card all answer."""
    facts = CudaFacts(ort_packages=["onnxruntime-gpu"], ort_version=ort.__version__, ort_build_cuda="13.0",
                      available_providers=[CUDA_EP, CPU_EP], driver_cuda_version=13000, cu_init_result=0,
                      device_count=1, compute_capabilities=[list(cc)])
    for name, value in overrides.items():
        setattr(facts, name, value)
    return facts


@dataclass
class FailingGpu:
    stage: str  # "create", "warmup", or "runN": the Nth run and every one after it
    kind: str
    model: str = ""  # a substring of the model's file name; empty: every model

    @classmethod
    def from_env(cls) -> "FailingGpu | None":
        spec = os.environ.get(ENV_VAR)
        if not spec:
            return None
        stage, kind, *model = spec.split(":", 2)
        return cls(stage, kind, model[0] if model else "")

    @property
    def first_failing_run(self) -> int | None:
        if self.stage == "create":
            return None
        return 1 if self.stage == "warmup" else int(self.stage.removeprefix("run"))

    def session(self, source, options=None, providers=None, **kwargs):
        names = [p[0] if isinstance(p, tuple) else p for p in (providers or [])]
        if CUDA_EP not in names:
            return REAL_SESSION(source, options, providers=providers, **kwargs)
        targeted = self.model in str(source)
        if targeted and self.stage == "create":
            entry = recorded_error(self.kind, "create")
            if entry["exception"] is None:
                # ORT raises nothing here: it logs why on fd 2 and builds the session on the CPU.
                os.write(2, (entry["stderr"].rstrip("\n") + "\n").encode())
                return REAL_SESSION(source, options, providers=[CPU_EP], **kwargs)
            raise ort_exception(self.kind, "create")
        return _StandInCudaSession(REAL_SESSION(source, options, providers=[CPU_EP], **kwargs),
                                   self if targeted else None)

    def install(self, monkeypatch=None) -> None:
        if monkeypatch is not None:
            monkeypatch.setattr(ort, "InferenceSession", self.session)
        else:
            ort.InferenceSession = self.session


class _StandInCudaSession:
    """A real CPU session that reports the CUDA EP, as ORT does for a session it placed on the GPU."""

    def __init__(self, session, failure: FailingGpu | None) -> None:
        self._session = session
        self._failure = failure
        self.runs = 0

    def get_providers(self) -> list[str]:
        return [CUDA_EP, CPU_EP]

    def get_inputs(self):
        return self._session.get_inputs()

    def get_outputs(self):
        return self._session.get_outputs()

    def get_session_options(self):
        return self._session.get_session_options()

    def run(self, output_names, input_feed, run_options=None):
        self.runs += 1
        first = self._failure.first_failing_run if self._failure else None
        if first is not None and self.runs >= first:
            raise ort_exception(self._failure.kind, "run")
        return self._session.run(output_names, input_feed, run_options)
