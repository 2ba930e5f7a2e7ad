"""``triogate keys export FILE`` and ``triogate keys import FILE`` of such a
file (``control.keyexport``): key records with their identities, plans and
roles, for migration and declarative management.

``keys import`` existed before (issue 13: keys users already hold, by
plaintext or SHA-256: ``cli_import``). One command takes both: a file whose
first line is an export header (``"format": "triogate.keys"``) is imported
as records; anything else is the item import, unchanged. ``--dry-run`` is
for export files (the item import has no dry run).

``cli`` registers these and lends its helpers, so this module does not
import it back."""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from triogate.config import load_config
from triogate.control.audit import Actor
from triogate.control.crypto import environment_complete, load_secrets, secrets_file
from triogate.control.datadir import lmdb_path
from triogate.control.keyexport import (
    ParsedFile,
    check_secrets,
    export_lines,
    is_export_file,
    parse_file,
)
from triogate.control.keyexport_apply import import_records
from triogate.control.keyexport_models import ImportReport
from triogate.errors import SecretsMissing, ValidationError
from triogate.runtime.cli_import import add_import_command
from triogate.runtime.gateway import Services
from triogate.storage import MemoryStore

__all__ = ["add_keyexport_commands", "report_text"]

WithServices = Callable[[argparse.Namespace, Callable[[Services], Awaitable[Any]]], Any]
DataOptions = Callable[[argparse.ArgumentParser], None]
CLI_ACTOR = Actor("cli", None)
_json = msgspec.json.Encoder()


def _write_atomically(path: Path, lines: list[bytes]) -> None:
    """``lines`` to ``path`` (mode 0600: digests and sealed fields), whole
    or not at all: a temporary file beside it, synced, then renamed."""
    # mkstemp: a new file (O_EXCL, never through a symlink someone put at
    # a name they could guess), mode 0600 whatever the umask.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            for line in lines:
                f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def report_text(report: ImportReport, source: str) -> str:
    verb = "would be " if report.dry_run else ""
    head = "dry run, nothing written: " if report.dry_run else ""
    counts = (
        f"{head}{source}: {report.created} {verb}created, {report.updated} {verb}updated, "
        f"{report.unchanged} unchanged; {report.usage_written} usage records {verb}written"
    )
    changed = [c for c in report.changes if c.outcome != "unchanged"]
    if not changed:
        return f"{counts}\nnothing {'would change' if report.dry_run else 'changed'}: " + (
            "every record is already here"
        )
    lines = [f"  {c.outcome:<8} {c.type:<8} {c.id}  (line {c.line})" for c in changed]
    return "\n".join([counts, *lines])


#: The largest file an import reads (the records are held in memory while
#: they are decided): far past any real export (about a million keys), short
#: of what a file that never ends (``/dev/zero``, a pipe) would take.
MAX_FILE_BYTES = 1 << 30


def _read_bounded(stream: Any, what: str) -> str | None:
    data = stream.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        print(
            f"triogate: {what} is larger than {MAX_FILE_BYTES >> 20} MiB: "
            "split it (an import is idempotent record by record); nothing was imported",
            file=sys.stderr,
        )
        return None
    try:
        return data.decode() if isinstance(data, bytes) else str(data)
    except UnicodeDecodeError as exc:
        print(f"triogate: cannot read {what}: {exc}", file=sys.stderr)
        return None


def _read(file: str) -> str | None:
    """The whole file, at most ``MAX_FILE_BYTES``: a regular file, a pipe
    (``<(...)``) or standard input; never a device (``/dev/zero``)."""
    if file == "-":
        return _read_bounded(getattr(sys.stdin, "buffer", sys.stdin), "standard input")
    try:
        mode = os.stat(file).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            print(f"triogate: cannot read {file}: not a file", file=sys.stderr)
            return None
        with open(file, "rb") as f:
            return _read_bounded(f, file)
    except OSError as exc:
        print(f"triogate: cannot read {file}: {exc}", file=sys.stderr)
        return None


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    return load_config(Path(args.config) if args.config else None).data_dir


def _dry_run_on_nothing(args: argparse.Namespace, parsed: ParsedFile, source: str) -> Any:
    """A dry run where the data directory has no store yet: decided against
    an empty one (everything would be created), so the dry run does not make
    the store (and mark it with the secrets) it says it does not write."""
    secrets = load_secrets(_data_dir(args), create=False)
    check_secrets(parsed, secrets, source)
    return trio.run(
        lambda: import_records(MemoryStore(), parsed, CLI_ACTOR, clock=time.time, dry_run=True)
    )


def refuse_new_secrets(args: argparse.Namespace, source: str) -> None:
    """An export file needs the secrets it was made with. A data directory
    without secrets would generate new ones on opening, and then hold a
    store marked with them, refusing the right ones ever after: refused
    before anything is opened, with what to do."""
    if environment_complete():
        return
    config = load_config(Path(args.config) if args.config else None)
    data_dir = Path(args.data_dir) if args.data_dir else config.data_dir
    if not secrets_file(data_dir).exists():
        raise SecretsMissing(
            f"{data_dir} has no secrets file: {source} can only be imported with the secrets "
            f"it was exported with. Copy the source data directory's secrets file to "
            f"{secrets_file(data_dir)} (or set TRIOGATE_HMAC_SECRET and "
            "TRIOGATE_ENCRYPTION_KEYS) first; nothing was imported"
        )


def add_keyexport_commands(
    keys: Any, data_options: DataOptions, with_services: WithServices
) -> None:
    """``export`` and ``import`` under the ``keys`` subcommands (``import``
    is ``cli_import``'s, taking export files as well)."""

    def export(args: argparse.Namespace) -> int:
        path = None if args.file == "-" else Path(args.file)
        if path is not None and path.exists() and not args.force:
            raise ValidationError.single("FILE", f"{args.file} exists: give --force to replace it")

        async def run(gw: Services) -> list[bytes]:
            return export_lines(gw.store, gw.secrets, gw.clock())

        lines: list[bytes] = with_services(args, run)
        if path is None:
            sys.stdout.write(b"\n".join(lines).decode() + "\n")
            return 0
        try:
            _write_atomically(path, lines)
        except OSError as exc:
            print(f"triogate: cannot write {args.file}: {exc}", file=sys.stderr)
            return 1
        header = msgspec.json.decode(lines[0])
        counts = ", ".join(f"{kind} {n}" for kind, n in header["counts"].items())
        print(f"exported to {args.file}: {counts} (records; no plaintext key)")
        return 0

    p = keys.add_parser(
        "export",
        help="write every key record, identity, plan and role to a file (no plaintext key)",
        description="Write the data directory's key records (digests, sealed fields, limits, "
        "credits, rotation state) with the identities, plans and roles they refer to, as "
        "JSON lines, for `triogate keys import` into a data directory with the same secrets.",
    )
    data_options(p)
    p.add_argument("file", metavar="FILE", help="where to write; - for standard output")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=export)

    add_import_command(keys, data_options, with_services)
    imp: argparse.ArgumentParser = keys.choices["import"]
    items = imp.get_default("func")
    imp.description = (
        "Import a `triogate keys export` file (records: idempotent, reports what changed, "
        "--dry-run) or keys users already hold (a JSON array or JSON lines of plaintext or "
        "SHA-256 items, as POST /keys/import takes)."
    )
    for action in keys._choices_actions:
        if action.dest == "import":
            action.help = "import a `keys export` file, or keys users hold (plaintext or SHA-256)"
    for argument in imp._actions:
        if argument.dest == "file":
            argument.help = (
                "a `keys export` file, or a JSON array or JSON lines of items; - for stdin"
            )
    imp.add_argument(
        "--dry-run",
        action="store_true",
        help="export files only: say what would change, write nothing",
    )

    def import_(args: argparse.Namespace) -> int:
        text = _read(args.file)
        if text is None:
            return 1
        if not is_export_file(text):
            if args.dry_run:
                raise ValidationError.single(
                    "--dry-run", "only for a `triogate keys export` file, not for key items"
                )
            # Read already (a pipe cannot be read twice): the item import
            # reads the same text again as its standard input.
            stdin, sys.stdin = sys.stdin, io.StringIO(text)
            try:
                status: int = items(argparse.Namespace(**{**vars(args), "file": "-"}))
            finally:
                sys.stdin = stdin
            return status
        parsed = parse_file(text)
        source = "standard input" if args.file == "-" else args.file
        refuse_new_secrets(args, source)
        if args.dry_run and not lmdb_path(_data_dir(args)).exists():
            report: ImportReport = _dry_run_on_nothing(args, parsed, source)
            print(_json.encode(report).decode() if args.json else report_text(report, source))
            return 0

        async def run(gw: Services) -> ImportReport:
            check_secrets(parsed, gw.secrets, source)
            return await import_records(
                gw.store, parsed, CLI_ACTOR, clock=gw.clock, dry_run=args.dry_run
            )

        report = with_services(args, run)
        print(_json.encode(report).decode() if args.json else report_text(report, source))
        return 0

    imp.set_defaults(func=import_)
