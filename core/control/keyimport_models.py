"""``POST /keys/import``'s request and answer (``keyimport`` does the work).

An item is what ``POST /keys`` takes (``CreateKeyRequest``: the same fields,
the same checks) plus the key itself: ``key`` (its plaintext) or ``sha256``
(the hex SHA-256 of its plaintext, when the plaintext is gone), and for the
latter an optional ``start`` hint (the plaintext's first characters).

The batch is validated as a list of anything: one bad item (not an object,
a bad field) is reported at its index and the others are imported.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from msgspec import Meta, Struct

from triogate.control.keyformat import MAX_IMPORTED_KEY_LENGTH, MIN_IMPORTED_KEY_LENGTH
from triogate.control.models import CreateKeyRequest, FieldErrorView

__all__ = [
    "MAX_IMPORT_ITEMS",
    "ImportFailure",
    "ImportKeyItem",
    "ImportKeysRequest",
    "ImportResult",
    "ImportedKey",
]

MAX_IMPORT_ITEMS: Final = 1000

PlaintextKey = Annotated[
    str,
    Meta(
        min_length=MIN_IMPORTED_KEY_LENGTH,
        max_length=MAX_IMPORTED_KEY_LENGTH,
        pattern=r"^[\x21-\x7e]+$",
        description="the key's plaintext (printable ASCII): digested at once, never stored",
    ),
]
Sha256Hex = Annotated[
    str,
    Meta(
        pattern=r"^[0-9A-Fa-f]{64}$",
        description="hex SHA-256 of the key's plaintext (its UTF-8 bytes)",
    ),
]
StartHint = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=16,
        pattern=r"^[\x21-\x7e]+$",
        description="with sha256: the plaintext's first characters, shown to tell keys apart",
    ),
]


class ImportKeyItem(CreateKeyRequest, forbid_unknown_fields=True):
    """One key to import: exactly one of ``key`` and ``sha256``."""

    key: PlaintextKey | None = None
    sha256: Sha256Hex | None = None
    start: StartHint | None = None


class ImportKeysRequest(Struct, forbid_unknown_fields=True):
    keys: Annotated[
        list[Any],
        Meta(
            min_length=1,
            max_length=MAX_IMPORT_ITEMS,
            description=(
                "1-1000 objects, each the fields of POST /keys plus 'key' (plaintext) or "
                "'sha256' (64 hex; optional 'start'); a bad item fails alone"
            ),
        ),
    ]


class ImportedKey(Struct):
    index: int  # the item's position in ``keys``
    id: str
    # True: the key was already here, imported with the same fields; nothing changed.
    existing: bool


class ImportFailure(Struct, omit_defaults=True):
    index: int
    code: str  # VALIDATION_ERROR, CONFLICT, STORAGE_FULL
    detail: str
    errors: list[FieldErrorView] | None = None  # VALIDATION_ERROR: paths within the item


class ImportResult(Struct):
    migrated: list[ImportedKey]
    failed: list[ImportFailure]
