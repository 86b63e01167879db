"""``ident gallery``: the operator's tools for 1:N galleries, and ``ident submit --identify``.

Two ways in, on purpose:

* list, stats, forget, threshold, export and import reach the gallery
  database directly (IDENT_GALLERY_URL, or the host's embedded PostgreSQL under
  IDENT_DATA_DIR), as the workers do; no fleet needs to run.
* enroll and ``submit --identify`` send jobs to the running fleet
  (IDENT_REDIS_URL): only a worker holds the embedding model. enroll also reads
  the database, to skip the files already enrolled; when it cannot, it sends
  every file and the workers skip what is there.

Naming rule of ``enroll NAME DIR``
    Each subfolder of DIR is one subject, named after the folder; every photo
    (or recording) under it, at any depth, is a template of that subject:
    ``DIR/alice/1.jpg``, ``DIR/alice/2019/beach.png``. A file directly in DIR
    is a subject of its own, named after the file's stem less one trailing
    ``_<digits>``: ``DIR/alice.jpg``, ``DIR/alice_01.jpg`` and
    ``DIR/alice_02.jpg`` all enrol ``alice``. Names starting with ``.`` are
    ignored, and so are files that are neither a photo nor a recording (by their
    content, as ``ident submit`` tells them apart).

Exit codes
    0  the command did its work. For enroll: every file was enrolled, already
       there, refused or ignored. A refusal (EnrollmentRefused: no face, two
       faces, a spoof, too little speech; or InvalidInput: a file the worker
       cannot decode) is the media's verdict, printed with its reason; sending
       it again would not change it, so it does not fail the run.
    1  some jobs failed (GalleryUnavailable, a timeout, a worker error): the
       report lists them, and running the same command again resumes.
    2  the command could not run at all: a typed error printed as
       ``Type: message``, as every ``ident`` command does (ident.cli.main).
    130  interrupted (Ctrl-C); the report shows how far it got.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tasks.errors import EnrollmentRefused, GalleryMismatch, GalleryNotFound, GalleryUnavailable, IdentError

console = Console()
err_console = Console(stderr=True)

BIOMETRIC_WARNING = (
    "The file holds biometric templates (an embedding of each subject's face or voice, with their ids): "
    "anyone who has it can match those people in other photos or recordings. Keep it encrypted, share it "
    "only over encrypted channels, and delete it once imported."
)
# One trailing "_<digits>" of a file's stem numbers a subject's photos: alice_01.jpg is alice.
NUMBERED = re.compile(r"^(?P<subject>.+?)_\d+$")
# A systemic failure: every job after it would fail the same way, so enroll stops sending.
STOPPING_ERRORS = ("GalleryUnavailable", "GalleryMismatch", "ConfigurationError", "ModelUnavailable")
POLL_S = 0.02


# --- parser ----------------------------------------------------------------------


def add_parser(sub) -> None:
    gallery = sub.add_parser(
        "gallery", help="1:N galleries: list, stats, enroll a folder, forget, threshold, export, import",
        description="Galleries of enrolled subjects for 1:N identification. list, stats, forget, threshold, "
                    "export and import reach the gallery database (IDENT_GALLERY_URL, or the embedded PostgreSQL "
                    "under IDENT_DATA_DIR); enroll sends jobs to the running fleet (IDENT_REDIS_URL). "
                    + BIOMETRIC_WARNING.replace("The file", "An export file"),
    )
    commands = gallery.add_subparsers(dest="gallery_command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="every gallery: modality, model, subjects, templates")
    listing.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    listing.set_defaults(func=cmd_list)

    stats = commands.add_parser("stats", help="one gallery's size, model, threshold and search method")
    stats.add_argument("name")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=cmd_stats)

    enroll = commands.add_parser(
        "enroll", help="enrol a folder through the running fleet: one subject per subfolder or per file stem",
        description="Enrol every photo or recording under DIR into gallery NAME through the fleet's workers. "
                    "Each subfolder of DIR is a subject (DIR/alice/1.jpg); a file directly in DIR is the subject "
                    "of its stem less a trailing _<digits> (DIR/alice_01.jpg is alice). Files already enrolled "
                    "are skipped, so running it again resumes. Refused media are reported with their reasons "
                    "and do not fail the run (exit 0); failed jobs exit 1.",
    )
    enroll.add_argument("name", help="the gallery (created on the first enrolment)")
    enroll.add_argument("directory", metavar="DIR", type=Path)
    enroll.add_argument("--kind", choices=("vision", "audio"),
                        help="photos or recordings (default: told from the files' content)")
    enroll.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for each job's result (default: 120)")
    enroll.add_argument("--concurrency", type=int, default=4, metavar="K",
                        help="jobs in flight at once (default: 4)")
    enroll.add_argument("--no-spoof-check", action="store_true",
                        help="skip liveness (faces) or anti-spoofing (voices), for media you already trust "
                             "(ID photos taken at a desk)")
    enroll.add_argument("--json", action="store_true", help="print the report as JSON")
    enroll.set_defaults(func=cmd_enroll)

    forget = commands.add_parser("forget", help="delete every template of a subject")
    forget.add_argument("name")
    forget.add_argument("subject")
    forget.set_defaults(func=cmd_forget)

    threshold = commands.add_parser(
        "threshold", help="show, set or clear a gallery's own open-set threshold",
        description="With VALUE (a cosine similarity from -1 to 1), identify's match must score at least it in "
                    "this gallery; --clear goes back to the workers' default; with neither, show it.",
    )
    threshold.add_argument("name")
    threshold.add_argument("value", nargs="?", type=float)
    threshold.add_argument("--clear", action="store_true", help="use the workers' default threshold again")
    threshold.set_defaults(func=cmd_threshold)

    export = commands.add_parser("export", help="write a gallery's templates to a JSON Lines file",
                                 description=f"Write gallery NAME to FILE. {BIOMETRIC_WARNING}")
    export.add_argument("name")
    export.add_argument("file", type=Path)
    export.set_defaults(func=cmd_export)

    importing = commands.add_parser(
        "import", help="add the templates of an export file to a gallery",
        description="Add the templates of FILE (made by `ident gallery export`) to gallery NAME, created for the "
                    "file's model if missing. A gallery of another model is refused; templates already there are "
                    f"skipped, so importing again resumes. {BIOMETRIC_WARNING}",
    )
    importing.add_argument("name")
    importing.add_argument("file", type=Path)
    importing.set_defaults(func=cmd_import)

    stop = commands.add_parser("stop-embedded", help="stop this host's embedded PostgreSQL (under IDENT_DATA_DIR)")
    stop.set_defaults(func=cmd_stop_embedded)


# --- the database ------------------------------------------------------------------


def open_store():
    from galleries.database import Database
    from galleries.store import GalleryStore
    from tasks.settings import load_settings

    settings = load_settings()
    database = Database(settings.gallery_url, settings.data_dir)
    return GalleryStore(database, settings.gallery_index_min_templates, settings.gallery_ef_search,
                        settings.gallery_shortlist)


def print_json(value) -> None:
    console.print_json(json.dumps(value, default=str))


def cmd_list(args) -> int:
    store = open_store()
    rows = store.galleries()
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        err_console.print(f"no galleries in {store.database.where()}")
        return 0
    table = Table(title=f"galleries in {store.database.where()}")
    table.add_column("name", overflow="fold")
    table.add_column("modality", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("subjects", justify="right", no_wrap=True)
    table.add_column("templates", justify="right", no_wrap=True)
    for row in rows:
        table.add_row(Text(row["name"]), row["modality"], row["model"], str(row["subjects"]), str(row["templates"]))
    console.print(table)
    return 0


def cmd_stats(args) -> int:
    stats = open_store().stats(args.name)
    if args.json:
        print_json(stats)
        return 0
    table = Table(title=f"gallery {args.name}", show_header=False)
    table.add_column("", no_wrap=True)
    table.add_column("", overflow="fold")
    for key, value in stats.items():
        table.add_row(key, Text("none (the workers' default)" if key == "threshold" and value is None
                                else str(value)))
    console.print(table)
    return 0


def cmd_forget(args) -> int:
    store = open_store()
    gallery = store.gallery(args.name)
    deleted = store.forget(args.name, args.subject, gallery.modality)
    if deleted:
        console.print(f"deleted {deleted} template(s) of {args.subject!r} from gallery {args.name!r}")
    else:
        # Forgetting is idempotent: a second request finds nothing, and that is no failure.
        err_console.print(f"[yellow]{args.subject!r} has no templates in gallery {args.name!r}:[/] nothing deleted "
                          f"(see `ident gallery stats {args.name}`)")
    return 0


def cmd_threshold(args) -> int:
    if args.clear and args.value is not None:
        raise IdentError("give a VALUE or --clear, not both")
    store = open_store()
    if args.value is not None and not math.isfinite(args.value):
        raise IdentError(f"a threshold is a cosine similarity from -1 to 1, got {args.value}")
    if args.clear or args.value is not None:
        gallery = store.set_threshold(args.name, None if args.clear else args.value)
    else:
        gallery = store.gallery(args.name)
    if gallery.threshold is None:
        default, where = default_threshold(gallery, store.stats(args.name)["templates"])
        console.print(f"gallery {args.name!r}: no threshold of its own; identify uses {default:g} ({where})")
    else:
        console.print(f"gallery {args.name!r}: threshold {gallery.threshold:g}")
    return 0


def default_threshold(gallery, templates: int) -> tuple[float, str]:
    """The threshold the workers use for a gallery without its own, and where it comes from."""
    from galleries.thresholds import default_threshold as workers_default
    from models.catalog import CATALOG
    from tasks.settings import load_settings

    spec = CATALOG.get(gallery.model)
    if spec is None:
        return math.nan, f"the catalog of the workers that run {gallery.model}"
    value, basis = workers_default(spec.params, gallery.modality, load_settings(), templates)
    if basis["source"] == "target_fpir":
        where = (f"FPIR {basis['target_fpir']:g} at its {templates} templates, IDENT_GALLERY_TARGET_FPIR; "
                 "it rises as the gallery grows")
    else:
        where = basis["source"]
    return value, f"{where}, if the workers have this host's settings"


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=False)


def cmd_export(args) -> int:
    from galleries import transfer

    store = open_store()
    total = store.stats(args.name)["templates"]
    with _progress() as progress:
        task = progress.add_task(f"exporting {args.name}", total=total)
        written = transfer.export_gallery(store, args.name, args.file, lambda n: progress.advance(task, n))
    console.print(f"exported {written} template(s) of gallery {args.name!r} to {args.file}")
    err_console.print(f"[yellow]{BIOMETRIC_WARNING}[/]")
    return 0


def cmd_import(args) -> int:
    from galleries import transfer

    store = open_store()
    with _progress() as progress:
        checking = progress.add_task(f"checking {args.file.name}", total=None)
        checked = transfer.check_file(args.file, lambda n: progress.advance(checking, n))
        progress.update(checking, total=checked.templates)
        loading = progress.add_task(f"importing into {args.name}", total=checked.templates)
        imported = transfer.import_gallery(store, args.name, args.file, lambda n: progress.advance(loading, n),
                                           checked=checked)
    what = "created for" if imported.created else "of"
    console.print(f"imported {imported.added} template(s) into gallery {args.name!r} ({what} "
                  f"{checked.header.model}); {imported.skipped} were there already")
    return 0


def cmd_stop_embedded(args) -> int:
    from galleries import embedded
    from tasks.settings import load_settings

    settings = load_settings()
    folder = embedded.cluster_dir(settings.data_dir)
    if embedded.stop(settings.data_dir):
        console.print(f"stopped the embedded PostgreSQL under {folder}")
    else:
        console.print(f"no embedded PostgreSQL runs under {folder}")
    if settings.gallery_url:
        err_console.print("[yellow]note:[/] IDENT_GALLERY_URL is set, so the galleries are not in the embedded "
                          "server anyway")
    return 0


# --- enroll ------------------------------------------------------------------------


@dataclass
class Item:
    path: Path
    subject: str
    kind: str = ""
    source: str = ""


@dataclass
class Report:
    gallery: str
    kind: str
    files: int = 0
    enrolled: list[Item] = field(default_factory=list)
    already: list[Item] = field(default_factory=list)
    refused: dict[str, list[Item]] = field(default_factory=lambda: defaultdict(list))
    failed: dict[tuple[str, str], list[Item]] = field(default_factory=lambda: defaultdict(list))
    ignored: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))
    not_sent: list[Item] = field(default_factory=list)
    stopped: str | None = None
    interrupted: bool = False

    def as_json(self) -> dict:
        return {
            "gallery": self.gallery, "kind": self.kind, "files": self.files,
            "enrolled": len(self.enrolled), "already_enrolled": len(self.already),
            "refused": [{"reason": reason, "files": [str(i.path) for i in items]}
                        for reason, items in self.refused.items()],
            "failed": [{"error": error, "message": message, "files": [str(i.path) for i in items]}
                       for (error, message), items in self.failed.items()],
            "ignored": [{"reason": reason, "files": [str(p) for p in paths]}
                        for reason, paths in self.ignored.items()],
            "not_sent": len(self.not_sent), "stopped": self.stopped, "interrupted": self.interrupted,
        }


def subject_of(directory: Path, path: Path) -> str:
    """The naming rule: the first folder under DIR, else the file's stem less a trailing _<digits>."""
    relative = path.relative_to(directory)
    if len(relative.parts) > 1:
        return relative.parts[0]
    numbered = NUMBERED.match(path.stem)
    return numbered.group("subject") if numbered else path.stem


def plan(directory: Path, kind: str | None, report: Report) -> list[Item]:
    """Every file to enrol, with its subject and kind; the rest goes to ``report.ignored``."""
    from galleries.names import checked_name
    from workers.formats import detect_kind
    from tasks.errors import InvalidInput

    if not directory.is_dir():
        raise IdentError(f"{directory} is not a folder: give the folder of photos or recordings to enrol")
    items = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        try:
            with path.open("rb") as handle:
                head = handle.read(16)
        except OSError as exc:
            report.ignored[f"cannot be read ({exc.strerror or exc})"].append(path)
            continue
        try:
            found = detect_kind(head)
        except IdentError:
            report.ignored["neither a photo nor a recording"].append(path)
            continue
        if kind is not None and found != kind:
            report.ignored[f"{'a recording' if found == 'audio' else 'a photo'}, not enrolled with --kind {kind}"
                           ].append(path)
            continue
        items.append(Item(path, subject_of(directory, path), found))
    bad_names = []
    for subject in sorted({item.subject for item in items}):
        try:
            checked_name(subject, "subject_id")
        except InvalidInput as exc:
            bad_names.append(f"{subject!r}: {exc}")
    if bad_names:
        raise IdentError(f"{len(bad_names)} subject name(s) under {directory} cannot be used; rename their folders "
                         "or files: " + "; ".join(bad_names[:10]) + (" ..." if len(bad_names) > 10 else ""))
    kinds = {item.kind for item in items}
    if len(kinds) > 1:
        photos = sum(item.kind == "vision" for item in items)
        raise IdentError(f"{directory} holds {photos} photo(s) and {len(items) - photos} recording(s); a gallery "
                         "holds one modality: pass --kind vision or --kind audio")
    if not items:
        raise IdentError(f"no {'photos or recordings' if kind is None else kind + ' files'} found under {directory}")
    return items


def file_source(path: Path) -> str:
    """What the worker records as the template's source: "sha256:" and the payload's hash."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def cmd_enroll(args) -> int:
    if args.concurrency < 1:
        raise IdentError("--concurrency must be at least 1")
    if not args.timeout > 0:
        raise IdentError("--timeout must be a positive number of seconds")
    from galleries.names import checked_name

    checked_name(args.name, "gallery name")
    report = Report(args.name, args.kind or "")
    items = plan(args.directory, args.kind, report)
    kind = report.kind = items[0].kind
    report.files = len(items)
    done = enrolled_sources(args.name, kind)

    seen: set[tuple[str, str]] = set()
    to_send: deque[Item] = deque()
    with _progress() as progress:
        hashing = progress.add_task("reading files", total=len(items))
        for item in items:
            try:
                item.source = file_source(item.path)
            except OSError as exc:
                report.failed[("OSError", f"cannot read it: {exc.strerror or exc}")].append(item)
                continue
            finally:
                progress.advance(hashing)
            key = (item.subject, item.source)
            if key in done or key in seen:
                report.already.append(item)
            else:
                seen.add(key)
                to_send.append(item)
        if to_send:
            from ident.fleet import make_client

            client = make_client()
            options = ({"liveness": False} if kind == "vision" else {"spoof": False}) if args.no_spoof_check \
                else None
            try:
                send_all(client, kind, args, options, to_send, report, progress)
            except KeyboardInterrupt:
                report.interrupted = True
                report.not_sent.extend(to_send)
    print_report(report, args.json)
    if report.interrupted:
        return 130
    return 1 if report.failed or report.not_sent else 0


def enrolled_sources(name: str, kind: str) -> set[tuple[str, str]]:
    """What the gallery holds already; empty (with a warning) when the database cannot be read from here."""
    store = open_store()
    try:
        try:
            gallery = store.gallery(name)
        except GalleryNotFound:
            return set()
        if gallery.modality != kind:
            raise GalleryMismatch(f"gallery {name!r} holds {gallery.modality} templates, and these are "
                                  f"{'photos' if kind == 'vision' else 'recordings'}: enrol them into another "
                                  "gallery")
        return store.enrolled_sources(name)
    except GalleryUnavailable as exc:
        err_console.print(f"[yellow]cannot read gallery {name!r} from here ({exc}):[/] every file is sent, and the "
                          "workers skip the ones already enrolled")
        return set()
    finally:
        store.database.close()


def send_all(client, kind: str, args, options, to_send: deque, report: Report, progress: Progress) -> None:
    """Keep ``args.concurrency`` enrol jobs in flight until every file is done (or a systemic error stops it)."""
    task = progress.add_task(f"enrolling into {args.name}", total=len(to_send))
    in_flight: dict[str, tuple[object, Item, float]] = {}
    try:
        while to_send or in_flight:
            while to_send and len(in_flight) < args.concurrency and report.stopped is None:
                item = to_send.popleft()
                try:
                    payload = item.path.read_bytes()
                except OSError as exc:
                    report.failed[("OSError", f"cannot read it: {exc.strerror or exc}")].append(item)
                    progress.advance(task)
                    continue
                result = client.enroll(kind, args.name, item.subject, payload, options)
                in_flight[result.id] = (result, item, time.monotonic())
            if report.stopped is not None and to_send:
                report.not_sent.extend(to_send)
                to_send.clear()
            finished = False
            for job_id, (result, item, sent) in list(in_flight.items()):
                if result.ready():
                    del in_flight[job_id]
                    record(result, item, report)
                elif time.monotonic() - sent > args.timeout:
                    del in_flight[job_id]
                    report.failed[("Timeout", f"no result within {args.timeout:g} s (is a {kind} worker "
                                              "running? `ident status`)")].append(item)
                else:
                    continue
                finished = True
                progress.advance(task)
            if not finished:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        report.not_sent.extend(item for _result, item, _sent in in_flight.values())
        raise


def record(result, item: Item, report: Report) -> None:
    try:
        value = result.get(timeout=5)
    except Exception as exc:  # the worker's typed error, re-raised by Celery
        names = {cls.__name__ for cls in type(exc).__mro__}
        message = str(exc)
        if names & {EnrollmentRefused.__name__, "InvalidInput"}:
            reason = message if "EnrollmentRefused" in names else f"{type(exc).__name__}: {message}"
            report.refused[reason].append(item)
            return
        report.failed[(type(exc).__name__, message)].append(item)
        if type(exc).__name__ in STOPPING_ERRORS and report.stopped is None:
            report.stopped = f"{type(exc).__name__}: {message}"
        return
    (report.already if value.get("already_enrolled") else report.enrolled).append(item)


def print_report(report: Report, as_json: bool) -> None:
    if as_json:
        print_json(report.as_json())
        return
    summary = Table(title=f"enrolment into {report.gallery} ({report.kind})", show_header=False)
    summary.add_column("", no_wrap=True)
    summary.add_column("", justify="right", no_wrap=True)
    summary.add_row("files", str(report.files))
    summary.add_row("[green]enrolled[/]", str(len(report.enrolled)))
    summary.add_row("already there", str(len(report.already)))
    summary.add_row("[yellow]refused[/]", str(sum(len(v) for v in report.refused.values())))
    summary.add_row("[red]failed[/]", str(sum(len(v) for v in report.failed.values())))
    if report.not_sent:
        summary.add_row("[red]not sent[/]", str(len(report.not_sent)))
    ignored = sum(len(v) for v in report.ignored.values())
    if ignored:
        summary.add_row("ignored", str(ignored))
    console.print(summary)
    for title, colour, groups in (("refused", "yellow", {r: items for r, items in report.refused.items()}),
                                  ("failed", "red", {f"{e}: {m}": items for (e, m), items in report.failed.items()})):
        if not groups:
            continue
        table = Table(title=f"{title}, by reason", title_style=colour)
        table.add_column("reason", overflow="fold", ratio=3)
        table.add_column("files", overflow="fold", ratio=2)
        for reason, items in sorted(groups.items(), key=lambda group: -len(group[1])):
            table.add_row(Text(reason), Text(_files([str(i.path) for i in items])))
        console.print(table)
    for reason, paths in report.ignored.items():
        err_console.print(f"ignored, {reason}: {_files([str(p) for p in paths])}")
    if report.stopped:
        err_console.print(f"[red]stopped sending after {report.stopped}[/]; fix it and run the same command again "
                          "to resume")
    elif report.interrupted:
        err_console.print("[yellow]interrupted:[/] run the same command again to resume (jobs already sent may "
                          "still finish)")
    elif report.failed:
        err_console.print("[red]some files failed;[/] run the same command again to retry them")


def _files(paths: list[str], shown: int = 8) -> str:
    more = len(paths) - shown
    return ", ".join(paths[:shown]) + (f" and {more} more" if more > 0 else "")


# --- submit --identify -----------------------------------------------------------------


def submit_identify(args, payloads: list[bytes], kinds: list[str]) -> int:
    """``ident submit --identify GALLERY FILE...``: each file's candidates, as tables or (--json) raw."""
    from ident.fleet import make_client

    client = make_client()
    pending = [client.identify(kind, args.identify, data) for kind, data in zip(kinds, payloads)]
    status = 0
    answers = []
    for name, kind, result in zip(args.files, kinds, pending):
        try:
            value = result.get(timeout=args.timeout)
        except Exception as exc:  # the worker's typed error, re-raised by Celery
            err_console.print(f"[red]{name}: {type(exc).__name__}:[/] {exc}")
            answers.append({"file": name, "error": {"type": type(exc).__name__, "message": str(exc)}})
            status = 1
            continue
        answers.append({"file": name, "result": value})
        if not args.json:
            console.print(identify_table(name, kind, value))
    if args.json:
        print_json(answers)
    return status


def identify_table(name: str, kind: str, result: dict) -> Table:
    table = Table(title=f"{name} in gallery {result['gallery']} (threshold {result['threshold']:g}, "
                        f"{result['model']})")
    if kind == "vision":
        table.add_column("face", justify="right", no_wrap=True)
        table.add_column("bbox", no_wrap=True)
        rows = [([str(index), ", ".join(f"{v:.0f}" for v in face["bbox"])], face)
                for index, face in enumerate(result["faces"], 1)]
    else:
        table.add_column("speech s", justify="right", no_wrap=True)
        rows = [([f"{result['speech_s']:g}"], result)]
    table.add_column("candidates (cosine)", overflow="fold")
    table.add_column("match", overflow="fold")
    for cells, verdict in rows:
        candidates = Text("\n".join(f"{c['subject_id']}  {c['score']:.3f}" for c in verdict["candidates"])
                          or "(gallery is empty)")
        match = Text(verdict["match"], style="bold green") if verdict["match"] is not None \
            else Text("stranger", style="yellow")
        table.add_row(*cells, candidates, match)
    if kind == "vision" and not rows:
        table.caption = "no face found"
    return table
