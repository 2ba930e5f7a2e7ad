"""Time-ordered identifiers (ULID layout: 48-bit milliseconds + 80 random bits,
Crockford base32). Sorting ids sorts by creation time, so "newest first" is a
reverse scan and a cursor is simply the last id a page showed."""

from __future__ import annotations

import os
import re
import time

__all__ = ["IdGenerator", "is_valid_id", "new_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_RE = re.compile(r"^[a-z]{3}_[0-9A-HJKMNP-TV-Z]{26}$")


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


class IdGenerator:
    """Monotonic within a process: two ids made in the same millisecond still
    sort in creation order (the random part is incremented)."""

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self, prefix: str, now: float | None = None) -> str:
        ms = int((time.time() if now is None else now) * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._last_rand += 1
        else:
            self._last_ms = ms
            self._last_rand = int.from_bytes(os.urandom(10), "big") >> 1
        return f"{prefix}_{_encode(ms, 10)}{_encode(self._last_rand, 16)}"


new_id = IdGenerator()


def is_valid_id(value: str, prefix: str) -> bool:
    return bool(_ID_RE.match(value)) and value.startswith(prefix + "_")
