"""Keys imported by their SHA-256 (``POST /keys/import {"sha256": …}``): the
weak index that finds them until their first use.

Such a key's plaintext is gone: the gateway cannot compute its HMAC digest,
so its record keeps the SHA-256 in ``digest`` with ``digest_version`` 0
(``SHA256_VERSION``: no HMAC secret has it, they count from 1), and
``KEY_SHA256`` maps that SHA-256 to its id. A key the HMAC index does not
know is tried there (``Sha256Index.find``); found, it is "stale" exactly
as a key found under an older HMAC secret is, and its first successful use
re-indexes it under the HMAC (``KeyService.reindex``), which removes its
``KEY_SHA256`` entry (``drop_sha256``): the unsalted digest does not stay.

The common path pays nothing: a key found under its HMAC never comes here,
and an unknown key pays the second digest only while some SHA-256 import
exists. Whether one does is held in memory: set at once by the process
that imports, and re-read from the table (its first entry, one read) at
most once a second on a miss, which is how other processes (workers, the
CLI) learn of imports and of the last one being used.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Final

from triogate.storage import KeyRecord, Store, Table, WriteTxn, codec

__all__ = ["RECHECK_SECONDS", "SHA256_VERSION", "Sha256Index", "drop_sha256", "sha256_of"]

#: ``KeyRecord.digest_version`` of a key known only by its SHA-256.
SHA256_VERSION: Final = 0
#: How stale "no SHA-256 import exists" may be in a process that did not import.
RECHECK_SECONDS: Final = 1.0

_MISS: Final[tuple[None, bool]] = (None, False)


def sha256_of(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode()).digest()


def drop_sha256(txn: WriteTxn, record: KeyRecord) -> None:
    """Remove ``record``'s SHA-256 index entry, if it is such a key (its
    re-index under the HMAC, its purge)."""
    if record.digest_version == SHA256_VERSION:
        txn.delete(Table.KEY_SHA256, record.digest)


class Sha256Index:
    """The data plane's look-up of SHA-256-imported keys (one per key
    service). Synchronous and read-only, like the HMAC look-up."""

    __slots__ = ("_any", "_monotonic", "_next_check", "_store")

    def __init__(self, store: Store, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._monotonic = monotonic
        self._any = False
        self._next_check = 0.0  # the first miss looks

    def __repr__(self) -> str:
        return f"<Sha256Index any={self._any}>"

    def mark_present(self) -> None:
        """This process just imported a key by its SHA-256: look from now on."""
        self._any = True
        self._next_check = self._monotonic() + RECHECK_SECONDS

    def present(self) -> bool:
        """Whether any key is (or was, within ``RECHECK_SECONDS``) indexed
        by its SHA-256."""
        now = self._monotonic()
        if now >= self._next_check:
            self._next_check = now + RECHECK_SECONDS
            with self._store.read() as txn:
                self._any = next(iter(txn.scan(Table.KEY_SHA256)), None) is not None
        return self._any

    def find(self, plaintext: str) -> tuple[KeyRecord | None, bool]:
        """(the record of the key imported as sha256(plaintext), True: it
        wants re-indexing), or (None, False)."""
        # Printable ASCII only: what an import accepts, and what a header
        # carries the same way as it was hashed.
        if not plaintext.isascii() or not self.present():
            return _MISS
        digest = sha256_of(plaintext)
        raw = self._store.get_through(Table.KEY_SHA256, digest, Table.KEYS)
        if raw is None:
            return _MISS
        record = codec.key.decode(raw)
        # The index names the record; the record's own digest decides (a
        # record re-indexed under the HMAC is no longer found this way).
        if record.digest_version != SHA256_VERSION or not hmac.compare_digest(
            record.digest, digest
        ):
            return _MISS
        return record, True
