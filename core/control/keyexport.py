"""``triogate keys export FILE``: the key records of a data directory as a
file another data directory (with the same secrets) imports
(``keyexport_apply``); and reading such a file back, line by line.

What is exported: every key (whatever its status: a migration keeps the
revoked and rotated ones, their ids stay taken), every identity, plan and
role (what keys refer to: a migration file brings them along, as an Unkey or
Kong user expects), and the usage records that hold the keys' and
identities' credit balances and counters. Records go out *as stored*:
digests, sealed owner and metadata, owner tags, credits and their version,
refill, expiry, rotation grace state, route-bound limits. Never a plaintext
key: the gateway does not have one.

The balances are the stored ones: a running server's actors flush theirs
every ``[storage] flush_interval_seconds``, so an export next to a busy
server may miss the last second of spending (the docs say so).
"""

from __future__ import annotations

import msgspec

from triogate import __version__
from triogate.control.crypto import ServerSecrets
from triogate.control.keyexport_models import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    MIRRORS,
    RECORD_TYPES,
    ExportHeader,
    ExportLine,
    Kind,
)
from triogate.control.keysha256 import SHA256_VERSION
from triogate.control.timeutil import utc_required
from triogate.errors import FieldError, SecretsError, ValidationError
from triogate.storage import KeyRecord, ReadTxn, Store, Table, codec
from triogate.storage.records import IdentityRecord

__all__ = [
    "ParsedFile",
    "Record",
    "check_secrets",
    "export_lines",
    "is_export_file",
    "parse_file",
    "used_versions",
]

_encoder = msgspec.json.Encoder()
_header_decoder = msgspec.json.Decoder(ExportHeader)
_line_decoder = msgspec.json.Decoder(ExportLine)
_mirror_decoders = {k: msgspec.json.Decoder(t) for k, t in MIRRORS.items()}
#: A file with more errors than this stops being read: the first ones say it.
MAX_ERRORS = 50


def _line(kind: Kind, record_id: str, record: msgspec.Struct) -> bytes:
    fields = msgspec.structs.asdict(record)
    return _encoder.encode({"type": kind, "id": record_id, "record": fields})


def export_lines(store: Store, secrets: ServerSecrets, now: float) -> list[bytes]:
    """The whole file, one JSON document per line (no newlines), header
    first. Read in one snapshot: the file is one consistent state."""
    out: dict[Kind, list[bytes]] = {k: [] for k in KINDS}
    usage_ids: list[str] = []
    with store.read() as txn:
        tables: tuple[tuple[Table, Kind], ...] = (
            (Table.PLANS, "plan"),
            (Table.ROLES, "role"),
            (Table.IDENTITIES, "identity"),
            (Table.KEYS, "key"),
        )
        for table, kind in tables:
            decoder = getattr(codec, kind)
            for raw_id, raw in txn.scan(table):
                record = decoder.decode(raw)
                out[kind].append(_line(kind, raw_id.decode(), record))
                if isinstance(record, KeyRecord):
                    usage_ids.extend(dict.fromkeys((record.id, record.state_key)))
                elif isinstance(record, IdentityRecord):
                    usage_ids.append(record.id)
        for usage_id in dict.fromkeys(usage_ids):
            usage = txn.get(Table.USAGE, usage_id.encode())
            if usage is not None:
                out["usage"].append(_line("usage", usage_id, codec.usage.decode(usage)))
    fingerprints = secrets.fingerprints()
    header = ExportHeader(
        format=FORMAT,
        version=FORMAT_VERSION,
        exported_at=_encoder.encode(utc_required(now)).decode().strip('"'),
        triogate=__version__,
        secrets={kind: {str(v): fp for v, fp in fps.items()} for kind, fps in fingerprints.items()},
        counts={k: len(v) for k, v in out.items()},
    )
    return [_encoder.encode(header), *(line for k in KINDS for line in out[k])]


# ---- reading a file back ---------------------------------------------------------


class Record(msgspec.Struct, frozen=True):
    """One record line of a file: its line number (1-based) and record."""

    line: int
    kind: Kind
    id: str
    record: msgspec.Struct


class ParsedFile(msgspec.Struct, frozen=True):
    header: ExportHeader
    records: list[Record]


def _first_line(text: str) -> tuple[int, str] | None:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            return number, line
    return None


def is_export_file(text: str) -> bool:
    """Whether ``text`` claims to be an export file: its first line is a
    JSON object naming the format (whatever is wrong further on is for
    ``parse_file`` to say)."""
    first = _first_line(text)
    if first is None:
        return False
    try:
        doc = msgspec.json.decode(first[1])
    except (msgspec.DecodeError, RecursionError):  # nested past msgspec's depth
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _where(message: str) -> tuple[str, str]:
    """msgspec's ``... - at `$.record.x` `` as (field, message)."""
    head, sep, at = message.rpartition(" - at `")
    if not sep:
        return "$", message
    return at.rstrip("`"), head


_TOO_DEEP = "nested too deeply to be a record"
#: The largest integer a record field may hold: the counters an import moves
#: forwards (``version + 1``) stay within msgpack's 64 bits, and JSON readers
#: that read numbers as doubles see them exactly.
MAX_INT = 2**53


def _out_of_range(record: msgspec.Struct) -> tuple[str, str] | None:
    """(field, message) for a record the store could not hold: an integer
    field past ``MAX_INT`` (one past it would overflow msgpack when an
    import moves a counter forwards) or anything msgpack cannot encode (a
    huge integer inside ``metadata``)."""
    for name in type(record).__struct_fields__:
        value = getattr(record, name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and not -MAX_INT <= v <= MAX_INT:
                return f"$.record.{name}", f"is out of range (at most {MAX_INT} either way)"
    try:
        codec.encode(record)
    except (OverflowError, TypeError, ValueError) as exc:
        return "$.record", f"cannot be stored: {exc}"
    return None


def parse_file(text: str) -> ParsedFile:
    """The header and records of an export file; ValidationError naming
    the line and field of every problem (up to ``MAX_ERRORS``)."""
    errors: list[FieldError] = []
    first = _first_line(text)
    if first is None:
        raise ValidationError.single("line 1", "the file is empty")
    number, line = first
    try:
        header = _header_decoder.decode(line)
    except RecursionError:
        raise ValidationError.single(f"line {number}: $", _TOO_DEEP) from None
    except msgspec.DecodeError as exc:
        field, message = _where(str(exc))
        raise ValidationError.single(f"line {number}: {field}", message) from None
    if header.format != FORMAT or header.version != FORMAT_VERSION:
        raise ValidationError.single(
            f"line {number}: $.version",
            f"format {header.format} version {header.version} is not one this triogate "
            f"reads ({FORMAT} version {FORMAT_VERSION})",
        )
    records: list[Record] = []
    lines = text.splitlines()
    for index in range(number, len(lines)):
        raw = lines[index]
        if not raw.strip():
            continue
        where = f"line {index + 1}"
        try:
            entry = _line_decoder.decode(raw)
        except RecursionError:
            errors.append(FieldError(where + ": $", _TOO_DEEP))
            if len(errors) >= MAX_ERRORS:
                break
            continue
        except msgspec.DecodeError as exc:
            errors.append(FieldError(where + ": " + _where(str(exc))[0], _where(str(exc))[1]))
            if len(errors) >= MAX_ERRORS:
                break
            continue
        try:
            mirrored = _mirror_decoders[entry.type].decode(entry.record)
        except RecursionError:
            errors.append(FieldError(where + ": $.record", _TOO_DEEP))
            if len(errors) >= MAX_ERRORS:
                break
            continue
        except msgspec.DecodeError as exc:
            field, message = _where(str(exc))
            errors.append(FieldError(f"{where}: {field.replace('$', '$.record', 1)}", message))
            if len(errors) >= MAX_ERRORS:
                break
            continue
        try:
            record = RECORD_TYPES[entry.type](**msgspec.structs.asdict(mirrored))
        except (TypeError, ValueError) as exc:  # a record's own __post_init__
            errors.append(FieldError(f"{where}: $.record", str(exc)))
            if len(errors) >= MAX_ERRORS:
                break
            continue
        out_of_range = _out_of_range(record)
        if out_of_range is not None:
            errors.append(FieldError(f"{where}: {out_of_range[0]}", out_of_range[1]))
            if len(errors) >= MAX_ERRORS:
                break
            continue
        own_id = getattr(record, "id", entry.id)
        if own_id != entry.id:
            errors.append(FieldError(f"{where}: $.id", f"is {entry.id!r}, the record's {own_id!r}"))
            continue
        records.append(Record(index + 1, entry.type, entry.id, record))
    if errors:
        raise ValidationError(errors)
    return ParsedFile(header, records)


# ---- the secrets the records were made with ---------------------------------------


def used_versions(records: list[Record]) -> dict[str, set[int]]:
    """Per kind, the secret versions the records need: their digests' and
    owner tags' HMAC versions, their sealed fields' encryption versions."""
    used: dict[str, set[int]] = {"hmac": set(), "encryption": set()}
    for r in records:
        if isinstance(r.record, KeyRecord):
            if r.record.digest_version != SHA256_VERSION:
                used["hmac"].add(r.record.digest_version)
            used["hmac"].add(r.record.owner_tag_version)
            if len(r.record.sealed) >= 3:
                used["encryption"].add(int.from_bytes(r.record.sealed[1:3], "big"))
    return used


def check_secrets(parsed: ParsedFile, secrets: ServerSecrets, source: str) -> None:
    """SecretsError unless every secret version the file's records need is
    here, the very same (by fingerprint), and no version both know differs:
    records made with other secrets would never validate or unseal."""
    mine = secrets.fingerprints()
    labels = {"hmac": "HMAC secret", "encryption": "encryption key"}
    problems: list[str] = []
    for kind, label in labels.items():
        theirs = parsed.header.secrets.get(kind, {})
        for version, fp in sorted(mine.get(kind, {}).items()):
            if str(version) in theirs and theirs[str(version)] != fp:
                problems.append(f"{label} version {version} differs")
        for version in sorted(used_versions(parsed.records)[kind]):
            if str(version) not in theirs:
                problems.append(f"the file's header has no {label} version {version}")
            elif version not in mine.get(kind, {}):
                problems.append(f"this data directory has no {label} version {version}")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SecretsError(
            f"{source} was exported with other secrets ({'; '.join(unique)}): its keys' "
            "digests and sealed fields would not match here. Import it where the secrets are "
            "the same (the data directory's secrets file, or TRIOGATE_HMAC_SECRET and "
            "TRIOGATE_ENCRYPTION_KEYS); nothing was imported"
        )


def read_record(txn: ReadTxn, kind: Kind, record_id: str) -> msgspec.Struct | None:
    """The stored record of ``kind`` with ``record_id``, or None."""
    table = {
        "plan": Table.PLANS,
        "role": Table.ROLES,
        "identity": Table.IDENTITIES,
        "key": Table.KEYS,
        "usage": Table.USAGE,
    }[kind]
    raw = txn.get(table, record_id.encode())
    if raw is None:
        return None
    decoded: msgspec.Struct = getattr(codec, kind).decode(raw)
    return decoded
