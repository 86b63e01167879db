"""`ident bench` refuses impossible counts before it contacts the fleet."""

from __future__ import annotations

import argparse

import pytest

from ident.bench import add_arguments, baseline_batch


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ident bench", exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(["--kind", "vision", *argv])


def test_defaults_run_the_done_when_command_warmed_by_its_own_workload():
    args = parse()
    # No --batch: the baseline batches as the fleet does (see ident.bench.baseline_batch).
    assert (args.jobs, args.concurrency, args.batch, args.warm_jobs) == (120, [8], None, None)


def test_a_sweep_is_a_comma_list_of_levels():
    assert parse("--concurrency", "1, 4,8").concurrency == [1, 4, 8]


def test_a_sweep_repeating_a_level_is_refused():
    with pytest.raises(argparse.ArgumentError, match="repeats a value"):
        parse("--concurrency", "2,2")


def test_no_warm_up_is_allowed():
    assert parse("--warmup", "0").warm_jobs == 0


@pytest.mark.parametrize("argv", [
    ("--jobs", "0"), ("--jobs", "many"), ("--concurrency", "0"), ("--concurrency", "1,,2"),
    ("--batch", "2,3"), ("--warmup", "-1"),
])
def test_impossible_counts_are_refused(argv):
    with pytest.raises(argparse.ArgumentError, match="whole number"):
        parse(*argv)


def test_the_baseline_batches_as_the_fleet_does_unless_asked_otherwise():
    assert baseline_batch(None, 1) == (1, None)
    assert baseline_batch(None, 8) == (8, None)
    assert baseline_batch(8, 8) == (8, None)
    batch, note = baseline_batch(1, 8)
    assert batch == 1 and "fleet batches up to 8" in note and "baseline 1" in note
