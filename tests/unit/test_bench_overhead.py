"""How ident bench splits a job's time outside the worker: waiting, dispatch, return."""

from __future__ import annotations

import pytest

from ident.bench import JobRecord, split_overhead


def record(sent, free_since, started, finished, received) -> JobRecord:
    return JobRecord(sent_at=sent, received_at=received, free_since=free_since, started_at=started,
                     finished_at=finished)


def test_a_job_sent_to_an_idle_process_has_no_waiting():
    job = record(sent=10.000, free_since=9.0, started=10.003, finished=10.050, received=10.051)
    split_overhead([job])
    assert job.waiting_ms == 0
    assert job.dispatch_ms == pytest.approx(3.0)
    assert job.return_ms == pytest.approx(1.0)
    assert job.end_to_end_ms == pytest.approx(job.dispatch_ms + 47.0 + job.return_ms)


def test_time_behind_a_busy_process_is_waiting_not_overhead():
    # Sent while the process ran (and then reported) another job: free at 10.120.
    job = record(sent=10.000, free_since=10.120, started=10.122, finished=10.170, received=10.171)
    split_overhead([job])
    assert job.waiting_ms == pytest.approx(120.0)
    assert job.dispatch_ms == pytest.approx(2.0)
    assert job.return_ms == pytest.approx(1.0)
    assert job.end_to_end_ms == pytest.approx(job.waiting_ms + job.dispatch_ms + 48.0 + job.return_ms)


def test_clock_jitter_never_gives_negative_times():
    job = record(sent=10.0005, free_since=9.0, started=10.000, finished=10.050, received=10.0499)
    split_overhead([job])
    assert (job.waiting_ms, job.dispatch_ms, job.return_ms) == (0.0, 0.0, 0.0)
