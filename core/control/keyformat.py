"""The shape of an API key: ``prefix + body + checksum``.

* body: 256 random bits in base62, always 43 characters;
* checksum: CRC32 of ``prefix + body`` in base62, always 6 characters.

The checksum lets the gateway refuse a mistyped, truncated or made-up key
without touching storage (and lets secret scanners recognise leaked keys). It
is not a security feature: the HMAC digest lookup is.
"""

from __future__ import annotations

import re
import secrets
import zlib
from typing import Final

__all__ = ["BODY_LENGTH", "CHECKSUM_LENGTH", "KeyFormat"]

_B62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH: Final = 43  # 62**43 > 2**256
CHECKSUM_LENGTH: Final = 6  # 62**6 > 2**32
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,15}_$")


def _b62(value: int, length: int) -> str:
    out = ["0"] * length
    for i in range(length - 1, -1, -1):
        value, rem = divmod(value, 62)
        out[i] = _B62[rem]
    return "".join(out)


# Two base62 digits at a time: the checksum is computed on every validation,
# and three table lookups cost a third of six divmods.
_PAIRS: Final = tuple(a + b for a in _B62 for b in _B62)


def _checksum(head: str) -> str:
    value = zlib.crc32(head.encode())
    hi, rest = divmod(value, 62**4)
    mid, lo = divmod(rest, 62**2)
    return _PAIRS[hi] + _PAIRS[mid] + _PAIRS[lo]


class KeyFormat:
    """Generates and checks keys for one prefix (``tg_`` for API keys,
    ``tgadm_`` for admin keys). Pure: no I/O, no state but the prefix."""

    __slots__ = ("_head_length", "length", "prefix")

    def __init__(self, prefix: str) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"key prefix {prefix!r} must be lowercase letters/digits ending in '_'"
            )
        self.prefix = prefix
        self.length = len(prefix) + BODY_LENGTH + CHECKSUM_LENGTH
        self._head_length = len(prefix) + BODY_LENGTH

    def __repr__(self) -> str:
        return f"KeyFormat(prefix={self.prefix!r})"

    def generate(self) -> str:
        head = self.prefix + _b62(secrets.randbits(256), BODY_LENGTH)
        return head + _checksum(head)

    def is_well_formed(self, key: str) -> bool:
        if len(key) != self.length or not key.startswith(self.prefix):
            return False
        # Base62 is exactly ASCII letters and digits: two C-level checks.
        if not (key.isascii() and key[len(self.prefix) :].isalnum()):
            return False
        head = key[: self._head_length]
        return secrets.compare_digest(key[self._head_length :], _checksum(head))

    def start(self, key: str) -> str:
        """A short, non-secret hint that lets people tell their keys apart."""
        return key[: len(self.prefix) + 4]
