"""``triogate keys import FILE``: ``POST /keys/import`` on the data directory,
for a file of any length (sent in batches of 1,000).

FILE (``-``: standard input) is a JSON array of items or JSON lines (one
item a line; blank lines skipped); an item is what ``POST /keys/import``
takes. A line that is not JSON fails alone, at its index, as a bad item
does. Prints the counts and each failure (``--json``: the whole answer,
indexes counted over the file); the exit status is 0 when every item was
imported (or was already), else 1.

``cli`` registers this (``add_import_command``) and lends its helpers, so
this module does not import it back."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from triogate.control.audit import Actor
from triogate.control.keyimport import KeyImporter
from triogate.control.keyimport_models import (
    MAX_IMPORT_ITEMS,
    ImportedKey,
    ImportFailure,
    ImportResult,
)
from triogate.errors import FieldError, ValidationError
from triogate.runtime.gateway import Services

__all__ = ["add_import_command", "read_items"]

WithServices = Callable[[argparse.Namespace, Callable[[Services], Awaitable[Any]]], Any]
DataOptions = Callable[[argparse.ArgumentParser], None]
CLI_ACTOR = Actor("cli", None)
_json = msgspec.json.Encoder()
_BAD_LINE = object()  # a JSON line that does not decode: failed at its index


def read_items(text: str) -> list[Any]:
    """The items of a JSON array or of JSON lines; ValidationError for an
    array that does not decode (a bad line is an item of its own)."""
    body = text.strip()
    if body.startswith("["):
        try:
            items = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:  # nested too deeply
            raise ValidationError([FieldError("$", f"invalid JSON: {exc}")]) from None
        if not isinstance(items, list):
            raise ValidationError.single("$", "expected a JSON array or JSON lines")
        return items
    out: list[Any] = []
    for line in body.splitlines():
        if line.strip():
            try:
                out.append(msgspec.json.decode(line))
            except (msgspec.DecodeError, RecursionError):
                out.append(_BAD_LINE)
    return out


async def import_all(gw: Services, items: list[Any]) -> ImportResult:
    """Every item imported in batches of ``MAX_IMPORT_ITEMS``; indexes over
    the whole list."""
    importer = KeyImporter(gw.keys)
    migrated: list[ImportedKey] = []
    failed: list[ImportFailure] = []
    for start in range(0, len(items), MAX_IMPORT_ITEMS):
        batch = items[start : start + MAX_IMPORT_ITEMS]
        good = [(i, item) for i, item in enumerate(batch) if item is not _BAD_LINE]
        failed.extend(
            ImportFailure(index=start + i, code="VALIDATION_ERROR", detail="$: invalid JSON line")
            for i, item in enumerate(batch)
            if item is _BAD_LINE
        )
        if not good:
            continue
        result = await importer.run([item for _, item in good], CLI_ACTOR)
        # Back to the file's indexes: the batch's, then the bad lines skipped.
        where = [start + i for i, _ in good]
        migrated.extend(msgspec.structs.replace(m, index=where[m.index]) for m in result.migrated)
        failed.extend(msgspec.structs.replace(f, index=where[f.index]) for f in result.failed)
    failed.sort(key=lambda f: f.index)
    return ImportResult(migrated=migrated, failed=failed)


def _summary(result: ImportResult) -> str:
    existing = sum(1 for m in result.migrated if m.existing)
    lines = [
        f"migrated {len(result.migrated)} ({existing} already present), failed {len(result.failed)}"
    ]
    lines.extend(f"item {f.index}: {f.code}: {f.detail}" for f in result.failed)
    return "\n".join(lines)


def add_import_command(keys: Any, data_options: DataOptions, with_services: WithServices) -> None:
    """Add ``import`` to the ``keys`` subcommands."""

    def run(args: argparse.Namespace) -> int:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(args.file).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                print(f"triogate: cannot read {args.file}: {exc}", file=sys.stderr)
                return 1
        items = read_items(text)
        if not items:
            raise ValidationError.single("$", "no keys in the file")
        result: ImportResult = with_services(args, lambda gw: import_all(gw, items))
        print(_json.encode(result).decode() if args.json else _summary(result))
        return 1 if result.failed else 0

    p = keys.add_parser(
        "import",
        help="import keys users already hold (JSON array or lines; - for stdin)",
    )
    data_options(p)
    p.add_argument("file", metavar="FILE", help="JSON array or JSON lines of items; - for stdin")
    p.set_defaults(func=run)
