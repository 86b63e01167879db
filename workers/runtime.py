"""The per-process runtime: one ONNX Runtime session per model, and the pipeline over them.

Each pool process, after the fork, builds one :class:`WorkerRuntime`: it opens
every model's session, pinned to GPU ``IDENT_GPU_IDS[k mod n]`` for pool
process k, warms them up, and only then takes jobs (workers/wiring.py). The
main process learns the worker's facts (:class:`WorkerIdentity`) at start and
its pool processes inherit them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from celery.utils.log import current_process_index

from tasks.contract import CPU_EP_NAME, CUDA_EP_NAME, DEVICE_FIELD, EXECUTION_PROVIDER_FIELD
from tasks.errors import DeviceUnavailable, IdentError
from tasks.settings import Settings, load_settings
from workers import metrics
from workers import status as status_files

# Builds a kind's pipeline from its sessions, specs and settings.
PipelineFactory = Callable[[dict, dict, Settings], Any]


@dataclass
class WorkerIdentity:
    """Facts about this worker that the main process learns and its children inherit."""

    kind: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    pool_processes: int = 1
    main_pid: int = field(default_factory=os.getpid)


@dataclass
class ProcessState:
    """What this process knows about itself: the worker it belongs to, its runtime, or why it has none."""

    identity: WorkerIdentity = field(default_factory=WorkerIdentity)
    pipelines: dict[str, PipelineFactory] = field(default_factory=dict)
    # The worker app this process serves (workers/wiring.py makes it).
    app: Any = None
    runtime: "WorkerRuntime | None" = None
    # Why this pool process could not load its models; it then serves nothing.
    load_failure: IdentError | None = None


PROCESS = ProcessState()


class WorkerRuntime:
    """The sessions and the pipeline of one worker process."""

    def __init__(self, kind: str, settings: Settings, process_index: int, pool_processes: int) -> None:
        from models.catalog import selected_models
        from models.runtime import cpu_threads_per_session, open_session, plan_device
        from workers.allocator import keep_freed_memory

        # First, so that loading the models already allocates under these settings.
        self.allocator = keep_freed_memory()
        self.kind = kind
        self.settings = settings
        self.pid = os.getpid()
        self.process_index = process_index
        self.device_id = gpu_for_process(settings.gpu_ids, process_index)
        started = time.perf_counter()
        plan = plan_device(settings.device, self.device_id, conv_algo_search=settings.cudnn_conv_algo_search,
                           tf32=settings.cuda_tf32)
        threads = cpu_threads_per_session(settings.cpu_threads, pool_processes)
        self.specs = selected_models(settings, kind)
        self.sessions = {
            role: open_session(spec, settings.models_dir,
                               plan.for_model(spec, settings.cpu_models, settings.gpu_mem_limit_mb, settings.max_batch),
                               threads)
            for role, spec in self.specs.items()
        }
        if settings.device == "cuda":
            on_cpu = [s.spec.key for s in self.sessions.values() if s.device != "CUDA" and s.reason_code != "cpu_models"]
            if on_cpu:
                raise DeviceUnavailable(f"IDENT_DEVICE=cuda but {', '.join(on_cpu)} run on CPU: {self.message()}")
        for session in self.sessions.values():
            session.on_device_change = lambda: self.publish_status(force=True)
        self.pipeline = PROCESS.pipelines[kind](self.sessions, self.specs, settings)
        from workers.galleries import GalleryJobs

        # Connects on its first job: a worker that never gets one needs no database.
        self.galleries = GalleryJobs(kind, self.pipeline, settings)
        self.load_ms = round((time.perf_counter() - started) * 1000.0, 1)
        self.jobs = 0
        self.job_started_at: float | None = None
        # When this process last became free to take a job: ready, or done
        # reporting its previous job (result stored). Lets ident bench tell
        # the queue's cost from time spent behind another job.
        self.free_since: float = time.time()
        self._published: str | None = None

    def providers(self) -> tuple[str, str, dict[str, str]]:
        """(execution_provider, device, {model: provider}) as of the last run."""
        models = {s.spec.key: s.provider for s in self.sessions.values()}
        distinct = sorted(set(models.values()), key=lambda p: (p != CUDA_EP_NAME, p))
        provider = "+".join(distinct)
        device = "CUDA" if distinct == [CUDA_EP_NAME] else ("CPU" if distinct == [CPU_EP_NAME] else "CUDA+CPU")
        return provider, device, models

    def message(self) -> str | None:
        """Why any model is on CPU; None when everything runs on CUDA."""
        reasons = {s.cpu_reason for s in self.sessions.values() if s.device != "CUDA" and s.cpu_reason}
        return "; ".join(sorted(reasons)) or None

    def status(self) -> dict:
        import onnxruntime as ort

        provider, device, _ = self.providers()
        return {
            "hostname": PROCESS.identity.hostname,
            "pid": self.pid,
            "queue": self.kind,
            "process_index": self.process_index,
            "state": "ready",
            DEVICE_FIELD: device,
            EXECUTION_PROVIDER_FIELD: provider,
            "message": self.message(),
            "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers(),
            "models": {s.spec.key: s.status() for s in self.sessions.values()},
            "load_ms": self.load_ms,
            "allocator": self.allocator,
            "jobs": self.jobs,
            # The worker's micro-batching (1 = off); ident bench sizes its baseline's batches by it.
            "max_batch": self.settings.max_batch,
            "max_wait_ms": self.settings.max_wait_ms,
            "galleries": self.galleries.status(),
        }

    def finish(self, result: dict) -> dict:
        """Add the provider fields every result carries, and republish status if it changed."""
        self.jobs += 1
        provider, device, models = self.providers()
        result[EXECUTION_PROVIDER_FIELD] = provider
        result[DEVICE_FIELD] = device
        result["models"] = models
        # Wall-clock stamps let a caller tell time spent queued from time spent
        # in transport (ident bench does); they identify no person.
        result["worker"] = {
            "hostname": PROCESS.identity.hostname,
            "pid": self.pid,
            "free_since": self.free_since,
            "started_at": self.job_started_at,
            "finished_at": time.time(),
        }
        self.publish_status()
        return result

    def publish_status(self, force: bool = False) -> None:
        provider_state = json.dumps(self.providers(), sort_keys=True)
        if force or provider_state != self._published:
            status_files.write_status_file(PROCESS.identity, self.status())
            self._published = provider_state


def gpu_for_process(gpu_ids: tuple[int, ...], process_index: int) -> int:
    """Pool process k of a worker uses GPU ids[k mod n]."""
    return gpu_ids[process_index % len(gpu_ids)]


def current_runtime() -> WorkerRuntime:
    """This process's runtime, built on first use in pools without worker_process_init."""
    runtime = PROCESS.runtime
    if runtime is None or runtime.pid != os.getpid():
        identity = PROCESS.identity
        if identity.kind is None:
            raise RuntimeError("this process is not a worker: start it with `celery -A workers.<kind> worker`")
        runtime = PROCESS.runtime = WorkerRuntime(identity.kind, load_settings(), current_process_index(base=0) or 0,
                                                  identity.pool_processes)
        # Each model's ident_model_info, and every run timed from now on (IDENT_METRICS_PORT).
        metrics.watch_models(runtime.sessions.values())
        runtime.publish_status(force=True)
    return runtime
