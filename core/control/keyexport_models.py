"""The ``triogate keys export`` file: its format and the report of an import.

The file is JSON lines. The first line is the header (``ExportHeader``):
the format name and version, when and by which triogate it was written, and
the *fingerprints* of the secrets its records were made with (never the
secrets). Every other line is one stored record, as stored, with its field
names: ``{"type": "plan" | "role" | "identity" | "key" | "usage", "id": ...,
"record": {...}}``. Bytes (digests, sealed fields, owner tags) are base64,
as msgspec writes them. Nothing in the file is a plaintext key: a key is its
HMAC digest (or, for a key imported by its SHA-256 and not used yet, that
SHA-256), its owner and metadata are AES-GCM sealed.

The record shapes are *mirrors* of ``storage.records``' (``mirror``): the
same field names, types and defaults, built from the record types
themselves, so a field added to a record is exported and imported with no
change here (a test checks the mirrors cover every field).
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_type_hints

import msgspec
from msgspec import Struct

from triogate.storage.records import (
    IdentityRecord,
    KeyRecord,
    PlanRecord,
    RoleRecord,
    UsageRecord,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "RECORD_TYPES",
    "Change",
    "ExportHeader",
    "ExportLine",
    "ImportReport",
    "Kind",
    "mirror",
]

FORMAT: Final = "triogate.keys"
FORMAT_VERSION: Final = 1

Kind = Literal["plan", "role", "identity", "key", "usage"]
#: The order records are written and applied in: what a record refers to
#: comes before it (a key names plans, roles and identities).
KINDS: Final[tuple[Kind, ...]] = ("plan", "role", "identity", "key", "usage")

RECORD_TYPES: Final[dict[str, type[Struct]]] = {
    "plan": PlanRecord,
    "role": RoleRecord,
    "identity": IdentityRecord,
    "key": KeyRecord,
    "usage": UsageRecord,
}


def mirror(record_type: type[Struct]) -> type[Struct]:
    """A Struct with ``record_type``'s fields, types and defaults, encoded
    as a JSON object (records are msgpack arrays) and strict about unknown
    fields: a typo in a hand-edited file is an error at its field."""
    hints = get_type_hints(record_type)
    fields = record_type.__struct_fields__
    defaults = record_type.__struct_defaults__
    first_default = len(fields) - len(defaults)
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        (name, hints[name])
        if i < first_default
        else (name, hints[name], defaults[i - first_default])
        for i, name in enumerate(fields)
    ]
    return msgspec.defstruct(
        f"{record_type.__name__}Entry", spec, forbid_unknown_fields=True, frozen=True
    )


MIRRORS: Final[dict[str, type[Struct]]] = {k: mirror(t) for k, t in RECORD_TYPES.items()}


class ExportHeader(Struct, forbid_unknown_fields=True, frozen=True):
    format: str
    version: int
    exported_at: str
    triogate: str
    # Per kind ("hmac", "encryption"): version (a string, as JSON keys are)
    # -> fingerprint (``control.crypto.fingerprint``).
    secrets: dict[str, dict[str, str]]
    counts: dict[str, int] = {}


class ExportLine(Struct, forbid_unknown_fields=True, frozen=True):
    """A record line; ``record`` is decoded against its kind's mirror."""

    type: Kind
    id: str
    record: msgspec.Raw


Outcome = Literal["created", "updated", "unchanged"]


class Change(Struct, frozen=True):
    """What an import did (or, dry, would do) to one record."""

    type: Kind
    id: str
    outcome: Outcome
    line: int


class ImportReport(Struct, frozen=True):
    dry_run: bool
    created: int
    updated: int
    unchanged: int
    # Usage records (balances, counters) written: only for a key or identity
    # that had none here (``keyexport`` says why).
    usage_written: int
    changes: list[Change]  # every record line, in file order
