"""``ident doctor``: the "why is it on CPU?" checklist, run on this host.

The command line: probe this host (or read saved probes), evaluate, and print
the checklist as a table or as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ident.doctor.checks import FAIL, OK, SKIP, WARN, DoctorError, DoctorReport, build_report
from ident.doctor.probes import collect

STATUS_STYLES = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks and the verdict as JSON")
    parser.add_argument("--no-models", action="store_true", help="skip the per-model CUDA sessions (node placement)")
    for kind in ("vision", "audio"):
        parser.add_argument(f"--{kind}-concurrency", type=int, default=1, metavar="N",
                            help=f"pool processes of the {kind} worker on this GPU, for the memory check (default 1)")
    parser.add_argument(
        "--save-probes", metavar="FILE", type=Path, help="also write the raw probes to FILE (attach it to a bug report)"
    )
    parser.add_argument(
        "--from-probes",
        metavar="FILE",
        type=Path,
        help="evaluate probes saved with --save-probes instead of probing this host",
    )


def run(args: argparse.Namespace) -> int:
    """0: CUDA would work here; 1: it would not (the verdict says why); 2: the doctor itself failed."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        if args.from_probes:
            report = build_report(_load_probes(args.from_probes))
        else:
            report = collect(models=not args.no_models,
                             pool_processes={"vision": args.vision_concurrency, "audio": args.audio_concurrency})
        if args.save_probes:
            try:
                args.save_probes.write_text(json.dumps(report.probes, indent=2, sort_keys=True) + "\n")
            except OSError as exc:
                raise DoctorError(f"cannot write the probes to {args.save_probes}: {exc.strerror or exc}") from exc
        if args.json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            render(report, Console())
    except DoctorError as exc:
        err.print(f"ident doctor: {exc}", markup=False, highlight=False)
        return 2
    except Exception:  # a bug in a probe must not look like "CUDA unusable"
        err.print("ident doctor: internal error", markup=False)
        err.print_exception()
        return 2
    return report.exit_code


def _load_probes(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DoctorError(f"cannot read probes from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DoctorError(f"{path} does not hold a probes object")
    return data


def render(report: DoctorReport, console) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="ident doctor: why would the worker run on CPU?", show_lines=True, expand=True)
    # rich sizes ratio columns by their share alone (min_width does not hold them):
    # 3 of 13 keeps "(libcuda.so.1)" whole on an 80-column terminal; narrower, it folds.
    table.add_column("check", ratio=3, overflow="fold")
    table.add_column("status", no_wrap=True, min_width=6)
    table.add_column("detail", ratio=6, overflow="fold")
    table.add_column("fix", ratio=4, overflow="fold")
    for check in report.checks:
        table.add_row(
            Text(check.name),
            Text(check.status, style=STATUS_STYLES[check.status]),
            Text(check.detail),
            Text(check.fix or ""),
        )
    console.print(table)
    style = "bold green" if report.cuda_usable else "bold red"
    console.print(Text(report.verdict, style=style))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ident doctor", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))

