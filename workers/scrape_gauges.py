"""What a worker's main process measures at each scrape of /metrics: demand, and the GPUs.

* ``ident_queue_length{queue}``: the jobs of each queue this worker consumes
  that no worker holds, summed over every Redis list that holds them
  (workers/kombu_internals.py, ``queued_job_lists``: the queue, kombu's
  priority sub-lists, the hand-over list). The same in every worker of a
  queue: take the max (or any one) across workers, never the sum.
* ``ident_jobs_in_progress{queue}``: the jobs this worker holds: received and
  not yet ended, whether prefetched, waiting in its batch, in a pool process's
  pipe or running (Celery's worker state, workers/celery_internals.py). Sum it
  across workers. Queued plus the sum of in progress is the queue's demand.
* ``ident_gpu_memory_used_bytes{gpu}`` and ``ident_gpu_utilization_ratio{gpu}``:
  every GPU NVML sees (``gpu`` is NVML's index), read through nvidia-ml-py
  (``pynvml``). A host without NVML (no driver, no GPU) has none of these
  series, and no error.

These are gauges of the moment, computed in the main process, so they need no
multiprocess files. A Redis that does not answer leaves ``ident_queue_length``
out of that scrape rather than failing it (/readyz says why).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable, Iterable, Mapping

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.kombu_internals import queued_job_lists

log = logging.getLogger(__name__)


def queue_lengths(client, queues: Iterable[str], transport_options: Mapping | None = None) -> dict[str, int]:
    """Each queue's jobs that no worker holds: one pipelined LLEN per list that may hold them."""
    queues = list(queues)
    lists = {queue: queued_job_lists(queue, transport_options) for queue in queues}
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in lists[queue]:
                pipe.llen(key)
        lengths = iter(pipe.execute())
    return {queue: sum(next(lengths) for _ in lists[queue]) for queue in queues}


def jobs_by_queue(job_queues: Iterable[str | None], queues: Iterable[str]) -> dict[str, int]:
    """Each consumed queue's count among the queues of the jobs held (a job of no known queue counts
    for the first one: it came through one of them); every consumed queue appears, 0 included."""
    queues = list(queues)
    counts = Counter(queue if queue in queues else (queues[0] if queues else queue) for queue in job_queues)
    return {queue: counts.get(queue, 0) for queue in queues}


class WorkerGauges(Collector):
    """A prometheus-client collector for the worker's queues and GPUs, read at each scrape."""

    def __init__(self, queues: Iterable[str], redis_client, held_job_queues: Callable[[], list[str | None]],
                 transport_options: Mapping | None = None, gpus: "GpuReader | None" = None) -> None:
        self.queues = sorted(queues)
        self.redis = redis_client
        self.held_job_queues = held_job_queues
        self.transport_options = dict(transport_options or {})
        self.gpus = gpus if gpus is not None else GpuReader()

    def collect(self):
        try:
            lengths = queue_lengths(self.redis, self.queues, self.transport_options)
        except Exception as exc:  # noqa: BLE001 -- an unreachable Redis leaves the series out, not the scrape
            log.debug("ident_queue_length left out: %s: %s", type(exc).__name__, exc)
        else:
            family = GaugeMetricFamily("ident_queue_length", "Jobs of the queue that no worker holds: the queue's "
                                       "Redis list, kombu's priority sub-lists and the hand-over list.",
                                       labels=["queue"])
            for queue, length in lengths.items():
                family.add_metric([queue], length)
            yield family
        family = GaugeMetricFamily("ident_jobs_in_progress", "Jobs this worker holds: prefetched, waiting for "
                                   "a batch or a pool process, or running.", labels=["queue"])
        for queue, count in jobs_by_queue(self.held_job_queues(), self.queues).items():
            family.add_metric([queue], count)
        yield family
        yield from self.gpus.collect()


class GpuReader:
    """NVML's figures of each GPU; nothing at all where NVML cannot be loaded.

    NVML is the driver's management library, not CUDA: reading it in the main
    process creates no CUDA context, so the pool processes forked later can
    still use CUDA. Tried once; a host without it is not asked again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml = None
        self._tried = False

    def _load(self):
        if not self._tried:
            self._tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # noqa: BLE001 -- NVMLError_LibraryNotFound, DriverNotLoaded, no module
                log.info("no GPU metrics: NVML is not available here (%s)", type(exc).__name__)
        return self._nvml

    def readings(self) -> list[tuple[str, int, float]]:
        """(gpu index, memory used in bytes, utilization 0-1) per GPU; [] without NVML."""
        with self._lock:
            nvml = self._load()
            if nvml is None:
                return []
            found = []
            try:
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                    try:
                        utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                    except nvml.NVMLError:  # some cards (and MIG slices) do not report it
                        utilization = None
                    found.append((str(index), int(memory.used), utilization))
            except nvml.NVMLError as exc:
                log.warning("reading the GPUs through NVML failed: %s", exc)
            return found

    def collect(self):
        readings = self.readings()
        if not readings:
            return
        memory = GaugeMetricFamily("ident_gpu_memory_used_bytes", "GPU memory in use, every process on the GPU "
                                   "together (NVML).", labels=["gpu"])
        utilization = GaugeMetricFamily("ident_gpu_utilization_ratio", "Share of the last sample period in which "
                                        "the GPU ran a kernel, 0 to 1 (NVML).", labels=["gpu"])
        for gpu, used, busy in readings:
            memory.add_metric([gpu], used)
            if busy is not None:
                utilization.add_metric([gpu], busy)
        yield memory
        yield utilization
