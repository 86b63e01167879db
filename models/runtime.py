"""ONNX Runtime sessions: one per model, created in the process that runs it.

``open_session`` tries the CUDA execution provider first (unless told not to),
falls back to CPU with a specific reason, and warms the session up. A session
that runs on CPU loads the graph as ``models.rewrite`` prepares it for this
onnxruntime (same outputs, around its slow PRelu kernel).
``ModelSession`` has the ``run``/``get_inputs`` interface of an ORT session, so
the model classes never know which provider they got, and it reads the
provider back from ORT after every run rather than assuming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from models.catalog import ModelSpec, gpu_memory_limit_mib
from models.cuda import CPU_EP, CUDA_EP, CudaFacts, explain_cpu_fallback, probe_cuda
from models.cuda_failures import CudaFailure, classify, explain, meaning, ort_words
from models.rewrite import for_cpu
from tasks.errors import DeviceUnavailable, ModelUnavailable

log = logging.getLogger(__name__)

# Warnings such as silero's ~200 "Removing initializer" lines are noise in a
# worker log; real failures reach us as exceptions or as the reasons below.
ort.set_default_logger_severity(3)

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class DevicePlan:
    """Which providers to ask for, and why CUDA is not among them when it is not.

    ``strict`` (IDENT_DEVICE=cuda) turns every CUDA failure into
    DeviceUnavailable instead of a move to the CPU; ``facts`` lets a failure's
    explanation name the card.
    """

    providers: list[Any]
    device_id: int | None
    cpu_reason: str | None
    strict: bool = False
    facts: CudaFacts | None = None
    # Short and stable, for status and metrics: device_cpu, cpu_models, cuda_unavailable.
    reason_code: str | None = None

    def for_model(self, spec: ModelSpec, cpu_models: Sequence[str] = (), gpu_mem_limit_mib: int = 0,
                  max_batch: int = 1) -> "DevicePlan":
        """This plan for one model: on the CPU if IDENT_CPU_MODELS names it, else with its own arena limit."""
        if self.device_id is None:
            return self
        if spec.key in cpu_models or spec.role in cpu_models:
            return replace(self, providers=[CPU_EP], device_id=None,
                           cpu_reason=f"IDENT_CPU_MODELS keeps {spec.key} on the CPU", reason_code="cpu_models")
        limit = gpu_mem_limit_mib or gpu_memory_limit_mib(spec, max_batch)
        options = {**self.providers[0][1], "gpu_mem_limit": limit * MIB}
        return replace(self, providers=[(CUDA_EP, options), CPU_EP])

    def cuda_failed(self, failure: CudaFailure, model: str, stage: str) -> str:
        """Why ``model`` leaves CUDA: ORT's words and what they mean here; DeviceUnavailable if strict."""
        cc = self.facts.compute_capability(self.device_id) if self.facts and self.device_id is not None else None
        reason = explain(failure, model, stage, ort.__version__, cc, self.gpu_mem_limit_mib)
        if self.strict:
            raise DeviceUnavailable(f"{reason}; IDENT_DEVICE=cuda forbids the CPU fallback (IDENT_DEVICE=auto allows it)")
        return reason

    @property
    def gpu_mem_limit_mib(self) -> int | None:
        if self.device_id is None:
            return None
        limit = self.providers[0][1].get("gpu_mem_limit")
        return limit // MIB if limit else None


MIB = 1 << 20
def plan_device(device: str, device_id: int, facts: CudaFacts | None = None, *,
                conv_algo_search: str = "HEURISTIC", tf32: bool = False) -> DevicePlan:
    """Decide the providers for IDENT_DEVICE=auto|cuda|cpu on this host.

    ``cuda`` is strict: when CUDA cannot run, it raises with the reason
    instead of quietly running on CPU.
    """
    if device == "cpu":
        return DevicePlan([CPU_EP], None, "IDENT_DEVICE=cpu asks for the CPU only", reason_code="device_cpu")
    facts = probe_cuda() if facts is None else facts
    strict = device == "cuda"
    reason = explain_cpu_fallback(facts, device_id)
    if reason is not None:
        if strict:
            raise DeviceUnavailable(f"IDENT_DEVICE=cuda but CUDA cannot be used: {reason}")
        return DevicePlan([CPU_EP], None, reason, facts=facts, reason_code="cuda_unavailable")
    cuda_options = {
        "device_id": device_id,
        "cudnn_conv_algo_search": conv_algo_search,
        # Grow each arena by what is asked for, not by doubling: on a 2 GiB
        # card a doubling step can ask for more than is left.
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": "1" if tf32 else "0",
    }
    return DevicePlan([(CUDA_EP, cuda_options), CPU_EP], device_id, None, strict=strict, facts=facts)


def cpu_threads_per_session(configured: int, pool_processes: int) -> int:
    """Intra-op threads so that all pool processes together fit the cores.

    Models of one job run one after another, so one process needs threads for
    one session at a time, not for all of them.
    """
    if configured > 0:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, pool_processes))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _captured_native_stderr() -> Iterator[list[str]]:
    """Collect what ORT's C++ code writes to fd 2 while a session is created.

    ORT reports why it declined an execution provider only on stderr; capturing
    it lets the fallback reason quote ORT's own words instead of a guess.
    """
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


CpuBuilder = Callable[[], tuple[ort.InferenceSession, tuple[str, ...]]]


class ModelSession:
    """One catalog model's ONNX Runtime session, with the provider it really uses.

    A CUDA session that fails (while warming up or on a job) is rebuilt on the
    CPU with ``cpu_session`` and the run is done again there; the reason,
    ORT's words and what they mean, is kept for status. Under a strict plan
    the failure is DeviceUnavailable instead.
    """

    def __init__(
        self,
        spec: ModelSpec,
        path: Path,
        sha256: str,
        session: ort.InferenceSession,
        threads: int,
        device_id: int | None,
        cpu_reason: str | None,
        rewrites: tuple[str, ...] = (),
        *,
        cpu_session: CpuBuilder | None = None,
        plan: DevicePlan | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        self.sha256 = sha256
        self.threads = threads
        self.cpu_reason = cpu_reason
        self.rewrites = rewrites
        self._session = session
        self._device_id = device_id
        self._cpu_session = cpu_session
        self._plan = plan
        self.provider = session.get_providers()[0]
        self.reason_code = "cuda_ok" if self.provider == CUDA_EP else None
        self.runs = 0
        # Called after the model moved to the CPU, so that status shows it at once.
        self.on_device_change: Callable[[], None] | None = None
        # Called after each run with (this session, the run's seconds, its rows):
        # the worker's metrics (workers/metrics.py) set it once the process is ready.
        self.on_run: Callable[["ModelSession", float, int], None] | None = None
        self._first_input: str | None = None

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray],
            stage: str = "running a job") -> list[np.ndarray]:
        started = time.perf_counter()
        try:
            outputs = self._session.run(output_names, input_feed)
        except Exception as exc:  # ORT raises its own unexported exception types
            failure = classify(str(exc)) if self.provider == CUDA_EP else None
            if failure is None:
                raise
            self._leave_cuda(failure, stage)
            started = time.perf_counter()  # the run that produced the outputs, on the CPU
            outputs = self._session.run(output_names, input_feed)
        seconds = time.perf_counter() - started
        self.runs += 1
        # ORT may drop an execution provider after a failure at run time; the
        # provider reported with a result must be the one that produced it.
        provider = self._session.get_providers()[0]
        if provider != self.provider and self.provider == CUDA_EP:
            self.cpu_reason = f"ONNX Runtime dropped the CUDA execution provider at run time (now {provider})"
            self.reason_code = "cuda_dropped"
        self.provider = provider
        if self.on_run is not None:
            if self._first_input is None:
                self._first_input = next((node.name for node in self._session.get_inputs()), "")
            self.on_run(self, seconds, rows_in(input_feed, self._first_input))
        return outputs

    def _leave_cuda(self, failure: CudaFailure, stage: str) -> None:
        if self._plan is None or self._cpu_session is None:
            raise DeviceUnavailable(f"{self.spec.key} failed on CUDA while {stage}: {failure.words}")
        reason = self._plan.cuda_failed(failure, self.spec.key, stage)
        try:
            self._session, self.rewrites = self._cpu_session()
        except ModelUnavailable as exc:
            raise DeviceUnavailable(f"{reason}; and it cannot run on the CPU either: {exc}") from None
        log.warning("%s moves to the CPU: %s", self.spec.key, reason)
        self.provider = CPU_EP
        self.cpu_reason = f"{reason}; moved to the CPU"
        self.reason_code = failure.code
        if self.on_device_change is not None:
            self.on_device_change()

    def get_inputs(self):
        return self._session.get_inputs()

    @property
    def device(self) -> str:
        return "CUDA" if self.provider == CUDA_EP else "CPU"

    @property
    def device_id(self) -> int | None:
        return self._device_id if self.provider == CUDA_EP else None

    def status(self) -> dict:
        return {
            "model": self.spec.key,
            "role": self.spec.role,
            "file": self.path.name,
            "sha256": self.sha256,
            "provider": self.provider,
            "device": self.device,
            "device_id": self.device_id,
            "threads": self.threads,
            "rewrites": list(self.rewrites),
            "reason": self.reason_code,
            "message": None if self.provider == CUDA_EP else self.cpu_reason,
        }


def rows_in(input_feed: Mapping[str, np.ndarray], first_input: str | None = None) -> int:
    """The rows of one run: the leading dimension of the model's first input (1 for a scalar or none)."""
    value = input_feed.get(first_input) if first_input is not None else None
    if value is None:
        value = next(iter(input_feed.values()), None)
    shape = getattr(value, "shape", ())
    return int(shape[0]) if len(shape) else 1


def model_path(spec: ModelSpec, models_dir: Path) -> Path:
    path = models_dir / spec.filename
    if not path.is_file():
        # `ident models fetch` only fetches files whose sha256 the catalog pins.
        get_it = (
            "run `ident models fetch` (or `ident models fetch --from DIR_OR_URL` for a mirror)"
            if spec.sha256 is not None
            else "the catalog pins no sha256 for it, so `ident models fetch` does not fetch it: place the file there yourself"
        )
        raise ModelUnavailable(
            f"model {spec.key} ({spec.filename}) is not in {models_dir}: {get_it}, or point IDENT_MODELS_DIR at "
            "the folder that holds it"
        )
    return path


def checked_model_file(spec: ModelSpec, models_dir: Path) -> tuple[Path, str]:
    """The model's file and its sha256; refused when it is missing or not the file the catalog pins."""
    path = model_path(spec, models_dir)
    sha256 = file_sha256(path)
    if spec.sha256 is not None and sha256 != spec.sha256:
        raise ModelUnavailable(
            f"{path} has sha256 {sha256}, but the catalog pins {spec.sha256} for {spec.key}: the "
            "file is corrupt or a different model; fetch it again with `ident models fetch`"
        )
    return path, sha256


def open_session(spec: ModelSpec, models_dir: Path, plan: DevicePlan, threads: int) -> ModelSession:
    """Create, check and warm one model's session: on CUDA when the plan says so and it works, else on CPU."""
    path, sha256 = checked_model_file(spec, models_dir)
    options = _session_options(threads)

    def cpu_session() -> tuple[ort.InferenceSession, tuple[str, ...]]:
        graph = for_cpu(path, ort.__version__)
        for rewrite in graph.rewrites:
            log.info("%s on CPU: %s (onnxruntime %s)", spec.key, rewrite, ort.__version__)
        return _session_on(path, graph.source, options, [CPU_EP]), graph.rewrites

    model = None
    if plan.device_id is not None:
        model = _cuda_session(spec, path, sha256, options, plan, threads, cpu_session)
    if model is None:
        session, rewrites = cpu_session()
        model = ModelSession(spec, path, sha256, session, threads, None, plan.cpu_reason, rewrites)
        model.reason_code = plan.reason_code
    warm_up(model)
    return model


def _cuda_session(spec: ModelSpec, path: Path, sha256: str, options: ort.SessionOptions, plan: DevicePlan,
                  threads: int, cpu_session: CpuBuilder) -> ModelSession | None:
    """The model's CUDA session, or, when ORT declines or fails to build one, its CPU session with the reason."""
    printed = io.StringIO()
    try:
        with _captured_native_stderr() as ort_messages, contextlib.redirect_stdout(printed):
            session = ort.InferenceSession(str(path), options, providers=plan.providers)
    except Exception as exc:  # ORT raises its own unexported exception types
        failure = classify(str(exc)) or CudaFailure("cuda_error", ort_words(str(exc)))
        reason = plan.cuda_failed(failure, spec.key, "creating its session")
        rebuilt, rewrites = cpu_session()
        log.warning("%s runs on the CPU: %s", spec.key, reason)
        model = ModelSession(spec, path, sha256, rebuilt, threads, plan.device_id, reason, rewrites)
        model.reason_code = failure.code
        return model
    if session.get_providers()[0] == CUDA_EP:
        return ModelSession(spec, path, sha256, session, threads, plan.device_id, None,
                            cpu_session=cpu_session, plan=plan)
    said = decline_reason([line.strip() for line in printed.getvalue().splitlines() if line.strip()] + ort_messages)
    reason = "ONNX Runtime declined the CUDA execution provider" + (f": {said}" if said else "")
    failure = classify(said or "")
    if failure is not None and failure.code != "cuda_error":
        cc = plan.facts.compute_capability(plan.device_id) if plan.facts else None
        reason += f"; {meaning(failure.code, ort.__version__, cc, plan.gpu_mem_limit_mib)}"
    if plan.strict:
        raise DeviceUnavailable(f"IDENT_DEVICE=cuda but {reason}")
    # Declined: the graph runs on CPU after all, prepared for it.
    rebuilt, rewrites = cpu_session()
    model = ModelSession(spec, path, sha256, rebuilt, threads, plan.device_id, reason, rewrites)
    model.reason_code = failure.code if failure else "cuda_declined"
    return model


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # A process runs its sessions one after another, each with its own intra-op
    # threads. Left spinning after a run, those threads take the cores from the
    # next session: a photo took 84 instead of 31 ms at two threads on two cores
    # (docs/benchmarks.md, "Intra-op threads").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def _session_on(path: Path, source: str | bytes, options: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # ORT raises its own unexported exception types
        raise ModelUnavailable(f"ONNX Runtime cannot load {path.name}: {exc}") from exc


# What ORT's log lines wrap around their message: a colour, a timestamp and a
# "[E:onnxruntime:...]" tag, then for an error its source location and status.
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_ORT_LOG_TAG = re.compile(r"^.*?\[[EWIV]:onnxruntime:[^\]]*\]\s*")
_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")


def decline_reason(ort_messages: list[str]) -> str | None:
    """ORT's own words on why CUDA was not taken: the first message about it, stripped to its text."""
    for message in ort_messages:
        if "cuda" in message.lower():
            text = _ORT_LOG_TAG.sub("", _ANSI_COLOUR.sub("", message))
            return _ORT_STATUS.split(text, 1)[-1].strip()
    return None


def warm_up(model: ModelSession) -> None:
    """One run on dummy input so that the first real job does not pay for
    lazy initialisation (memory arenas, cuDNN algorithm search), and so that a
    GPU that cannot run the model says so before any job."""
    model.run(None, warmup_feed(model), stage="warming up")


def warmup_feed(model: ModelSession) -> dict[str, np.ndarray]:
    shapes = model.spec.params.get("warmup_shapes", {})
    feed = {}
    for node in model.get_inputs():
        dtype = _NUMPY_TYPES.get(node.type, np.float32)
        if not node.shape and dtype == np.int64:
            feed[node.name] = np.array(model.spec.params.get("sample_rate", 16000), dtype=np.int64)
            continue
        shape = shapes.get(node.name) or [d if isinstance(d, int) and d > 0 else 1 for d in node.shape]
        feed[node.name] = np.zeros(shape, dtype=dtype)
    return feed
