"""A pool process that could not load its models hands every job back, uncounted."""

from __future__ import annotations

import pickle

import pytest
from celery.exceptions import Reject

from tasks.errors import ModelUnavailable
from workers import runtime, tasks, wiring


def test_a_process_without_models_requeues_its_jobs(monkeypatch):
    tasks.refuse_without_models()  # a process that loaded its models runs the job
    monkeypatch.setattr(runtime.PROCESS, "load_failure", ModelUnavailable("w600k_mbf.onnx is not a readable ONNX model"))
    with pytest.raises(Reject) as refused:
        tasks.refuse_without_models()
    assert refused.value.requeue is True
    assert "w600k_mbf.onnx" in str(refused.value.reason)
    # A batch's refusal crosses the pool's pipe to the main process, which requeues the batch.
    crossed = pickle.loads(pickle.dumps(refused.value))
    assert isinstance(crossed, Reject) and crossed.requeue is True


def test_a_refused_job_does_not_load_the_models_again(monkeypatch):
    """Celery's post-job hook runs for the refused job too: it must not build a runtime,
    which would load every model again and mark this process ready while it refuses all work."""

    def must_not_build():
        raise AssertionError("the models were loaded again after a load failure")

    monkeypatch.setattr(runtime.PROCESS.identity, "kind", "vision")
    monkeypatch.setattr(runtime.PROCESS, "load_failure", ModelUnavailable("w600k_mbf.onnx is not a readable ONNX model"))
    monkeypatch.setattr(wiring, "current_runtime", must_not_build)
    wiring._after_job(state="REJECTED", task=None, task_id="a-job")


def test_any_exception_while_loading_the_models_stops_the_worker_with_the_reason(monkeypatch):
    """Not only the project's own errors: a bug or a library's exception must not leave a process
    that serves with no models."""
    stopped = []

    def crash():
        raise KeyError("face_embedding")

    monkeypatch.setattr(runtime.PROCESS.identity, "kind", "vision")
    monkeypatch.setattr(runtime.PROCESS, "load_failure", None)
    monkeypatch.setattr(wiring, "current_runtime", crash)
    monkeypatch.setattr(wiring, "_stop_the_worker", stopped.append)
    wiring._on_process_init()
    (reason,) = stopped
    assert runtime.PROCESS.load_failure is reason and isinstance(reason, ModelUnavailable)
    assert "KeyError" in str(reason) and "face_embedding" in str(reason)
    with pytest.raises(Reject):
        tasks.refuse_without_models()
