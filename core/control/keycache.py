"""Keys looked up recently, remembered while nothing in storage changed.

A key's lookup (checksum, HMAC digest, two LMDB reads, a record decode) is
most of what validating it costs, and its answer depends only on the store's
contents, the HMAC keyring and the keyspaces (the prefixes and import
formats a key may have, swapped by a config reload). So the answer is kept
per plaintext for one *generation* of the store (LMDB's snapshot id; the
memory store's write count), one keyring and one keyspaces object: any write
anywhere in the store, by this process or another one on the same data
directory (workers, a cluster node's replica), a new keyring or a reloaded
keyspace empties the cache before the next lookup uses it. A hit is
exactly what a fresh lookup would read; the time-dependent decisions (expiry,
grace, scopes) are still made on every request.

The entries are plaintext keys in process memory, as Kong's key-auth cache
keeps them: never written anywhere, bounded (``LOOKUP_CACHE_SIZE``, oldest
out first), gone with the process. Only found keys are kept, so unknown keys
sprayed at the gateway do not fill it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from triogate.control.crypto import HmacKeyring
    from triogate.control.keyformat import Keyspaces
    from triogate.storage import KeyRecord

__all__ = ["LOOKUP_CACHE_SIZE", "LookupCache"]

LOOKUP_CACHE_SIZE: Final = 16_384


class LookupCache:
    """``(record, wants re-index)`` by plaintext, for one generation, keyring
    and keyspaces."""

    __slots__ = ("_entries", "_generation", "_keyring", "_keyspaces", "size")

    def __init__(self, size: int = LOOKUP_CACHE_SIZE) -> None:
        self.size = size
        self._entries: dict[str, tuple[KeyRecord, bool]] = {}
        self._generation = -1
        self._keyring: HmacKeyring | None = None
        self._keyspaces: Keyspaces | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, plaintext: str, generation: int, keyring: HmacKeyring, keyspaces: Keyspaces
    ) -> tuple[KeyRecord, bool] | None:
        if (
            generation != self._generation
            or keyring is not self._keyring
            or keyspaces is not self._keyspaces
        ):
            # Storage, secrets or keyspaces changed since these were read: all go.
            self._entries.clear()
            self._generation = generation
            self._keyring = keyring
            self._keyspaces = keyspaces
            return None
        return self._entries.get(plaintext)

    def put(
        self,
        plaintext: str,
        found: tuple[KeyRecord, bool],
        generation: int,
        keyring: HmacKeyring,
        keyspaces: Keyspaces,
    ) -> None:
        """Remember ``found``, read in ``generation`` under ``keyring`` (read
        before the lookup: a write landing during it makes the next ``get``
        start over, never serve the older read as current)."""
        if (
            generation != self._generation
            or keyring is not self._keyring
            or keyspaces is not self._keyspaces
            or self.size <= 0
        ):
            return
        entries = self._entries
        if len(entries) >= self.size:
            del entries[next(iter(entries))]  # oldest first: dicts keep insertion order
        entries[plaintext] = found
