"""`ident bench`'s report stays valid JSON when every job failed."""

from __future__ import annotations

import json

from ident.bench import percentiles


def test_percentiles_of_no_jobs_are_null_not_nan():
    # json.dumps writes NaN by default, which no strict JSON reader accepts.
    assert json.dumps(percentiles([]), allow_nan=False) == '{"p50": null, "p95": null, "p99": null}'


def test_percentiles_are_ordered_and_rounded():
    assert percentiles([1.0, 2.0, 3.0, 4.0]) == {"p50": 2.5, "p95": 3.85, "p99": 3.97}
