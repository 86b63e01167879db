"""ident: run, feed and inspect the fleet from a terminal."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ident import bench, doctor
from ident.fleet import make_client, stopped_by_signals
from ident.local_fleet import LocalFleetRunner
from tasks.errors import IdentError, ModelUnavailable
from workers.formats import detect_kind

console = Console()
err_console = Console(stderr=True)

def elide(value, full: bool = False):
    """Results with embeddings shortened for a terminal."""
    if full:
        return value
    if isinstance(value, dict):
        return {
            key: (f"<{len(item)} floats>" if key == "embedding" and isinstance(item, list) else elide(item))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [elide(item) for item in value]
    return value


def print_json(value) -> None:
    console.print_json(json.dumps(value, default=str))


# --- models ----------------------------------------------------------------------


def cmd_models(args) -> int:
    from models.catalog import CATALOG
    from models.fetch import default_models, fetch_one, verify
    from tasks.settings import load_settings

    settings = load_settings()
    specs = list(CATALOG.values()) if args.all else default_models(settings)
    if args.action == "verify":
        checks = verify(specs, settings.models_dir)
        table = Table(title=f"models in {settings.models_dir}")
        # The file name is what an operator has to place: folded, never cut short.
        table.add_column("model", no_wrap=True)
        table.add_column("file", overflow="fold")
        table.add_column("role", overflow="fold")
        table.add_column("state", no_wrap=True)
        colour = {"ok": "green", "missing": "red", "mismatch": "red", "unpinned": "yellow"}
        for check in checks:
            table.add_row(check.spec.key, check.spec.filename, check.spec.role,
                          f"[{colour[check.state]}]{check.state}[/]")
        console.print(table)
        # An unpinned file can only be checked by the operator who placed it: a warning, not a failure.
        return 0 if all(c.state in ("ok", "unpinned") for c in checks) else 1
    unpinned = [spec for spec in specs if spec.sha256 is None]
    for spec in unpinned:
        err_console.print(f"[yellow]skipped {spec.filename}:[/] no sha256 is pinned for {spec.key} "
                          f"({spec.source}); place the file in {settings.models_dir} yourself")
    specs = [spec for spec in specs if spec.sha256 is not None]
    failures = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err_console) as progress:
        for spec in specs:
            task = progress.add_task(spec.filename, total=spec.size_bytes)

            def report(done, total, task=task):
                progress.update(task, completed=done, total=total)

            try:
                path = fetch_one(spec, settings.models_dir, args.source, report, force=args.force)
                size = path.stat().st_size
                progress.update(task, description=f"[green]{spec.filename}", completed=size, total=size)
            except ModelUnavailable as exc:
                failures += 1
                progress.update(task, description=f"[red]{spec.filename}")
                err_console.print(f"[red]error:[/] {exc}")
    return 1 if failures else 0


# --- status ----------------------------------------------------------------------


def status_rows(replies: list[dict]) -> list[dict]:
    rows = []
    for reply in replies:
        for worker, body in reply.items():
            for process in body.get("processes", []):
                rows.append({"worker": worker, **process})
    return rows


def cmd_bench(args) -> int:
    # --via http drives the gateway (ident/http_bench.py, which builds on ident/bench.py).
    if args.via == "http":
        from ident import http_bench

        return http_bench.run(args)
    return bench.run(args)


def cmd_status(args) -> int:
    client = make_client()
    replies = client.model_status(timeout=args.timeout)
    rows = status_rows(replies)
    if args.json:
        print_json(rows)
    else:
        table = Table(title="fleet model status")
        for column in ("worker", "pid", "queue", "device", "providers", "message"):
            table.add_column(column, overflow="fold")
        for row in rows:
            providers = "\n".join(f"{k}: {v['provider']}" for k, v in (row.get("models") or {}).items())
            table.add_row(row["worker"], str(row.get("pid")), str(row.get("queue")), str(row.get("device")),
                          providers or row.get("state", ""), row.get("message") or "")
        console.print(table)
    if not rows:
        err_console.print("[red]no worker answered[/] (is the fleet running at IDENT_REDIS_URL?)")
        return 1
    return 0


# --- submit ----------------------------------------------------------------------


def read_inputs(files: list[str]) -> list[bytes]:
    payloads = []
    for name in files:
        try:
            payloads.append(Path(name).read_bytes())
        except OSError as exc:
            raise IdentError(f"cannot read {name}: {exc.strerror or exc}") from None
    return payloads


def cmd_submit(args) -> int:
    payloads = read_inputs(args.files)
    kinds = [args.kind or detect_kind(data) for data in payloads]
    if args.identify is not None:
        if args.verify or args.draw:
            raise IdentError("--identify searches a gallery for each file: it does not go with --verify or --draw")
        from galleries.names import checked_name
        from ident import gallery_cli

        checked_name(args.identify, "gallery name")
        return gallery_cli.submit_identify(args, payloads, kinds)
    if args.draw and (args.verify or kinds != ["vision"]):
        raise IdentError("--draw draws the faces found in one image: give it exactly one image file, without --verify")
    if args.verify and (len(payloads) != 2 or kinds[0] != kinds[1]):
        raise IdentError("--verify takes exactly two files of the same kind")
    if args.draw and not Path(args.draw).parent.is_dir():
        raise IdentError(f"--draw {args.draw}: the folder {Path(args.draw).parent} does not exist; create it first")
    client = make_client()
    if args.verify:
        pending = [client.verify(kinds[0], payloads[0], payloads[1])]
        labels = [f"{args.files[0]} vs {args.files[1]}"]
    else:
        pending = [client.analyze(kind, data) for kind, data in zip(kinds, payloads)]
        labels = list(args.files)
    status = 0
    for label, result in zip(labels, pending):
        try:
            value = result.get(timeout=args.timeout)
        except Exception as exc:  # the worker's typed error, re-raised by Celery
            err_console.print(f"[red]{label}: {type(exc).__name__}:[/] {exc}")
            status = 1
            continue
        if args.draw:
            from workers.vision.drawing import draw_file

            try:
                draw_file(payloads[0], value, Path(args.draw))
            except OSError as exc:  # the result is still printed below
                err_console.print(f"[red]cannot write {args.draw}:[/] {exc.strerror or exc}")
                status = 1
            else:
                err_console.print(f"drawn to {args.draw}")
        console.rule(label)
        print_json(elide(value, args.full))
    return status


# --- fleet -------------------------------------------------------------------------


def cmd_up(args) -> int:
    runner = LocalFleetRunner(args)
    with stopped_by_signals():
        try:
            runner.start()
            cmd_status(argparse.Namespace(json=False, timeout=2.0))
            err_console.print("fleet is up; Ctrl-C stops everything")
            while (ended := runner.first_exit()) is None:
                time.sleep(0.5)
            err_console.print(f"[red]{ended}[/]: stopping the rest of the fleet")
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            runner.stop()


def demo_samples() -> list[tuple[str, Path]]:
    from tasks.settings import load_settings

    data = load_settings().samples_dir
    samples = [
        ("vision", data / "images" / "multi_face" / "two_people.jpg"),
        ("vision", data / "images" / "liveness" / "spoof_F1_print.jpg"),
        ("audio", data / "audio" / "speakers" / "librispeech_1688_01.wav"),
        ("audio", data / "audio" / "antispoof" / "spoof" / "espeak_en-us.wav"),
    ]
    gallery_files = [data / name for *_, enrolled, probe, stranger in GALLERY_DEMO for name in (enrolled, probe, stranger)]
    missing = [str(path) for path in [path for _kind, path in samples] + gallery_files if not path.is_file()]
    if missing:
        raise IdentError(f"the demo's sample files are not there: {', '.join(missing)}. Point IDENT_SAMPLES_DIR at "
                         "the folder that holds images/ and audio/ (../shared/data beside the checkout)")
    return samples


def _demo_answer(kind: str, result: dict) -> str:
    if kind == "vision":
        lives = ", ".join("live" if f["liveness"]["is_live"] else "spoof" for f in result["faces"])
        return f"{len(result['faces'])} face(s): {lives}" if result["faces"] else "no face"
    if not result["speech_segments"]:
        return "no speech"
    spoof = result["spoof"]
    if spoof["speech_level_dbfs"] < spoof["min_speech_level_dbfs"]:
        verdict = f"too quiet to judge, {spoof['speech_level_dbfs']} dBFS"
    else:
        verdict = "bona fide" if spoof["is_bonafide"] else "spoof"
    return f"{len(result['speech_segments'])} speech segment(s), {verdict} ({spoof['score']:.2f})"


def cmd_demo(args) -> int:
    samples = demo_samples()
    runner = LocalFleetRunner(args)
    with stopped_by_signals(), embedded_gallery_database():
        try:
            return run_demo(runner, samples)
        except KeyboardInterrupt:
            err_console.print("demo interrupted")
            return 130
        finally:
            runner.stop()


@contextlib.contextmanager
def embedded_gallery_database():
    """Stop the embedded PostgreSQL at the end if the demo was what started it."""
    from galleries import embedded
    from tasks.settings import load_settings

    settings = load_settings()
    ours = not settings.gallery_url and embedded.running_pid(settings.data_dir) is None
    try:
        yield
    finally:
        if ours:
            embedded.stop(settings.data_dir)


# (kind, subject, enrolled file, probe of the same subject, a stranger), under IDENT_SAMPLES_DIR.
GALLERY_DEMO = (
    ("vision", "barack_obama", "images/faces/barack_obama_01.jpg", "images/faces/barack_obama_02.jpg",
     "images/faces/jennifer_aniston_01.jpg"),
    ("audio", "librispeech_1688", "audio/speakers/librispeech_1688_01.wav", "audio/speakers/librispeech_1688_02.flac",
     "audio/speakers/librispeech_533_01.wav"),
)
DEMO_GALLERY = "ident-demo"


def run_gallery_demo(client) -> None:
    """Enrol one person and one voice, identify another photo and recording of each and a stranger, forget."""
    from tasks.settings import load_settings

    data = load_settings().samples_dir
    table = Table(title=f"gallery {DEMO_GALLERY!r}: enrol, identify, forget")
    # The answers stay whole on an 80-column terminal; the file names fold.
    table.add_column("job", no_wrap=True)
    table.add_column("file", overflow="fold")
    table.add_column("answer", no_wrap=True)
    table.add_column("ms", justify="right", no_wrap=True)
    for kind, subject, enrolled, probe, stranger in GALLERY_DEMO:
        gallery = f"{DEMO_GALLERY}-{kind}"
        started = time.perf_counter()
        result = client.enroll(kind, gallery, subject, (data / enrolled).read_bytes()).get(timeout=120)
        table.add_row(f"{kind}.enroll", Path(enrolled).name, f"{result['templates']} template(s)",
                      f"{(time.perf_counter() - started) * 1000:.0f}")
        for path in (probe, stranger):
            started = time.perf_counter()
            result = client.identify(kind, gallery, (data / path).read_bytes()).get(timeout=120)
            answer = result["faces"][0] if kind == "vision" else result
            score, threshold = answer["candidates"][0]["score"], result["threshold"]
            verdict = (f"match {answer['match']} {score:.2f}" if answer["match"]
                       else f"stranger {score:.2f} < {threshold:.2f}")
            table.add_row(f"{kind}.identify", Path(path).name, verdict, f"{(time.perf_counter() - started) * 1000:.0f}")
        deleted = client.forget(kind, gallery, subject).get(timeout=60)["deleted"]
        table.add_row(f"{kind}.forget", "", f"{deleted} deleted", "")
    console.print(table)


def run_demo(runner: LocalFleetRunner, samples: list[tuple[str, Path]]) -> int:
    client = runner.start()
    console.rule("status calls")
    for kind in ("vision", "audio"):
        status = client.status(kind).get(timeout=30)
        console.print(f"{kind}.get_status: device={status['device']} "
                      f"execution_provider={status['execution_provider']}")
        if status.get("message"):
            console.print(f"  why not CUDA: {status['message']}")
    summary = Table(title="sample jobs")
    # On an 80-column terminal the file names fold and the answers wrap, so
    # that the execution provider, the point of the demo, is never cut short.
    summary.add_column("job", no_wrap=True)
    summary.add_column("file", overflow="fold")
    summary.add_column("answer")
    summary.add_column("execution_provider", no_wrap=True)
    summary.add_column("ms", justify="right", no_wrap=True)
    for kind, path in samples:
        started = time.perf_counter()
        result = client.analyze(kind, path.read_bytes()).get(timeout=120)
        elapsed = f"{(time.perf_counter() - started) * 1000:.0f}"
        console.rule(f"{kind}.analyze {path.name} ({elapsed} ms)")
        print_json(elide(result))
        summary.add_row(f"{kind}.analyze", path.name, _demo_answer(kind, result), result["execution_provider"], elapsed)
    console.print(summary)
    run_gallery_demo(client)
    return 0


# --- entry point -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ident", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def fleet_options(p):
        p.add_argument("--vision-concurrency", type=int, default=1, help="pool processes of the vision worker")
        p.add_argument("--audio-concurrency", type=int, default=1, help="pool processes of the audio worker")
        p.add_argument("--flower", action="store_true", help="also start the Flower dashboard")
        p.add_argument("--flower-port", type=int, default=5555, help="Flower's port (default: 5555)")
        p.add_argument("--flower-auth", default=None,
                       help="user:password for Flower's basic auth (IDENT_FLOWER_AUTH); "
                            "with no password a random one is made and printed")
        p.add_argument("--ready-timeout", type=float, default=180.0,
                       help="seconds to wait for every worker to load its models (default: 180)")

    up = sub.add_parser("up", help="run a local fleet in the foreground (embedded Redis unless IDENT_REDIS_URL is set)")
    fleet_options(up)
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="start a local fleet, run the sample inputs through it, stop")
    fleet_options(demo)
    demo.set_defaults(func=cmd_demo)

    submit = sub.add_parser("submit", help="send files to the fleet and print the results")
    submit.add_argument("files", nargs="+", help="photos or recordings; two with --verify")
    submit.add_argument("--kind", choices=("vision", "audio"), help="default: detected from the content")
    submit.add_argument("--verify", action="store_true", help="compare two files 1:1")
    submit.add_argument("--full", action="store_true", help="print embeddings instead of eliding them")
    submit.add_argument("--draw", metavar="OUT.jpg", help="write the image with faces drawn on it")
    submit.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each result (default: 120)")
    submit.add_argument("--identify", metavar="GALLERY",
                        help="search GALLERY for each file (1:N): candidates per face or voice, and the match")
    submit.add_argument("--json", action="store_true", help="with --identify: print the raw results as JSON")
    submit.set_defaults(func=cmd_submit, parser=submit)

    from ident import gallery_cli

    gallery_cli.add_parser(sub)

    status = sub.add_parser("status", help="every worker's pool processes, devices and providers")
    status.add_argument("--json", action="store_true", help="print the replies as JSON instead of a table")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for replies")
    status.set_defaults(func=cmd_status)

    models = sub.add_parser("models", help="fetch or verify the ONNX model files")
    models.add_argument("action", choices=("fetch", "verify"))
    models.add_argument("--from", dest="source", metavar="DIR_OR_URL", help="a mirror: a folder or an http(s) base URL")
    models.add_argument("--all", action="store_true", help="every catalog model, not only the configured ones")
    models.add_argument("--force", action="store_true", help="fetch again even when the file is already there")
    models.set_defaults(func=cmd_models)

    bench_parser = sub.add_parser("bench", help="throughput and latency of the running fleet against raw ONNX Runtime")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=cmd_bench)

    doctor_parser = sub.add_parser("doctor", help="find out why a GPU is not used")
    doctor.add_arguments(doctor_parser)
    doctor_parser.set_defaults(func=doctor.run)

    from ident import serve

    serve_parser = sub.add_parser("serve", help="the HTTP gateway in front of the fleet (docs/gateway.md)")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(func=serve.run_from_cli)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extras = parser.parse_known_args(argv)
    if args.command == "submit" and "--" not in argv:
        # argparse ends a nargs="+" positional at the first option, so the second
        # file of `ident submit A --verify B` would be left over: file names and
        # options may come in any order.
        return args.parser.parse_intermixed_args(argv[1:], argparse.Namespace(command="submit"))
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def redis_hint() -> str:
    """What to do when a command finds no Redis at IDENT_REDIS_URL."""
    if (os.environ.get("IDENT_REDIS_URL") or "").strip():
        return "Is the fleet running? Start its Redis at IDENT_REDIS_URL, or set IDENT_REDIS_URL to the fleet's Redis."
    # `ident up` embeds its Redis on a free port, never on the default one.
    return ("IDENT_REDIS_URL is unset (or empty), so the default was tried. Set it to the fleet's Redis: "
            "for a fleet run by `ident up`, the URL it printed as \"embedded redis-server at ...\".")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    try:
        return args.func(args)
    except IdentError as exc:
        err_console.print(f"[red]{type(exc).__name__}:[/] {exc}")
        return 2
    except (OperationalError, RedisConnectionError) as exc:
        from tasks.settings import load_settings, redacted_url

        url = redacted_url(load_settings().redis_url)
        err_console.print(f"[red]cannot reach Redis at {url}:[/] {exc}\n{redis_hint()}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
