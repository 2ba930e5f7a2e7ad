"""Cursor paging over time-ordered ids, newest first.

A cursor is the (opaque, base64url) id of the last item a page showed; the
next page is every id *strictly older* than it. Ids are assigned in creation
order, so a row inserted while a client pages sorts before the cursor and can
never show up twice, and every row that existed when paging began shows up
exactly once.

A page that filters (by status, actor, ...) stops after ``scan_budget`` rows
even if it found fewer than ``limit`` matches, and hands back a cursor to go
on: a request never walks the whole table on the event loop.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import TypeVar

from triogate.control.ids import is_valid_id
from triogate.errors import ValidationError

__all__ = ["SCAN_BUDGET", "decode_cursor", "encode_cursor", "take_page"]

T = TypeVar("T")
R = TypeVar("R")

SCAN_BUDGET = 10_000


def encode_cursor(item_id: str) -> str:
    return base64.urlsafe_b64encode(item_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, id_prefix: str) -> bytes | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not is_valid_id(raw, id_prefix):
        raise ValidationError.single("cursor", "invalid cursor")
    return raw.encode()


def take_page(
    rows: Iterable[tuple[str, T]],
    *,
    limit: int,
    keep: Callable[[T], bool],
    view: Callable[[T], R],
    scan_budget: int = SCAN_BUDGET,
) -> tuple[list[R], str | None]:
    """Walk ``(id, row)`` newest first; return up to ``limit`` views of kept
    rows and the cursor for the next page (None when there is no more)."""
    items: list[R] = []
    last_id: str | None = None
    scanned = 0
    for row_id, row in rows:
        if not keep(row):
            scanned += 1
            last_id = row_id
            if scanned >= scan_budget:
                return items, encode_cursor(row_id)
            continue
        if len(items) == limit:
            # One more match exists: there is a next page.
            assert last_id is not None
            return items, encode_cursor(last_id)
        items.append(view(row))
        last_id = row_id
        scanned += 1
    return items, None
