"""A pool process that could not load its models hands every job back, uncounted."""

from __future__ import annotations

import pickle

import pytest
from celery.exceptions import Reject

from tasks.errors import ModelUnavailable
from workers import bootstrap


def test_a_process_without_models_requeues_its_jobs(monkeypatch):
    bootstrap.refuse_without_models()  # a process that loaded its models runs the job
    monkeypatch.setattr(bootstrap, "_load_failure", ModelUnavailable("w600k_mbf.onnx is not a readable ONNX model"))
    with pytest.raises(Reject) as refused:
        bootstrap.refuse_without_models()
    assert refused.value.requeue is True
    assert "w600k_mbf.onnx" in str(refused.value.reason)
    # A batch's refusal crosses the pool's pipe to the main process, which requeues the batch.
    crossed = pickle.loads(pickle.dumps(refused.value))
    assert isinstance(crossed, Reject) and crossed.requeue is True
