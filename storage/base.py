"""The storage contract: an ordered key-value store with named tables.

Theory of operation
-------------------
Everything triogate persists lives in a handful of named tables (LMDB named
sub-databases). Keys are bytes that sort the way we want to page (time-ordered
ids, so newest-first is a reverse scan); values are msgpack records from
``records.py``.

* **Reads** are synchronous and cheap (an LMDB read transaction is a pointer
  snapshot, ~1 µs), so they run inline on the trio thread: ``store.read()``.
* **Writes** are functions ``fn(txn) -> result`` handed to ``await
  store.write(fn)``. Each runs atomically (all of its puts and deletes, or none
  if it raises) and is durable when the await returns. The LMDB store runs them
  on one writer thread and commits many queued functions in one transaction
  (group commit): one fsync for a burst of admin writes, and a failing function
  is rolled back alone.

A write function must be pure computation over the transaction: no I/O, no
awaiting, because it runs in a worker thread while trio goes on.

Errors are ``triogate.errors``' store family: ``StoreDamaged`` /
``StoreUnavailable`` when opening, ``StorageFull`` (a 507 refusal at every
boundary) when a write does not fit.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

import msgspec

__all__ = [
    "ReadTxn",
    "Store",
    "StoreStatistics",
    "Table",
    "WriteTxn",
    "prefix_successor",
]

T = TypeVar("T")


class Table(enum.Enum):
    """The named tables. The value is the sub-database name on disk."""

    # Members are singletons: identity hashing, in C. Enum's own __hash__ is
    # a Python function, and every store read looks its table up in a dict.
    __hash__ = object.__hash__

    KEYS = b"keys"  # key id -> KeyRecord
    KEY_DIGESTS = b"key_digests"  # HMAC digest -> key id
    KEY_OWNERS = b"key_owners"  # owner tag + key id -> b""
    USAGE = b"usage"  # key id -> UsageRecord
    ADMINS = b"admins"  # admin id -> AdminRecord
    ADMIN_DIGESTS = b"admin_digests"  # HMAC digest -> admin id
    AUDIT = b"audit"  # audit id (time-ordered) -> AuditRecord
    META = b"meta"  # small singletons, e.g. b"setup" -> first admin id
    # Issue 12 (customers). Index keys join ids with b"\x00" (ids never hold it).
    IDENTITIES = b"identities"  # identity id -> IdentityRecord
    IDENTITY_EXTERNAL_IDS = b"identity_external_ids"  # external_id (utf-8) -> identity id
    IDENTITY_KEYS = b"identity_keys"  # identity id + 0 + key id -> b""
    PLANS = b"plans"  # plan id -> PlanRecord
    PLAN_MEMBERS = b"plan_members"  # plan id + 0 + key or identity id -> b""
    ROLES = b"roles"  # role id -> RoleRecord
    ROLE_NAMES = b"role_names"  # role name (utf-8) -> role id
    ROLE_MEMBERS = b"role_members"  # role name + 0 + key id -> b"" (keys naming it)
    # Issue 13 (key import, control/keysha256.py): only keys imported by
    # their SHA-256, until first use re-indexes them under the HMAC.
    KEY_SHA256 = b"key_sha256"  # sha256(plaintext) -> key id
    KEY_IMPORTS = b"key_imports"  # b"id:" + key id -> ImportMark; b"sha256:" + tag -> key id
    # Issue 13 (events and webhooks, core/events/).
    EVENT_DELIVERIES = b"event_deliveries"  # delivery id -> DeliveryRecord (the log)
    EVENT_OUTBOX = b"event_outbox"  # due (8-byte ms) + delivery id -> b"" (pending ones)
    EVENT_MARKS = b"event_marks"  # event type + 0 + subject -> last emitted (8-byte ms)
    # Issue 13 (usage history, control/history.py): counts by outcome and
    # status class per minute, hour and day, for keys and identities.
    USAGE_HISTORY = b"usage_history"  # id + 0 + m|h|d + u32 minute -> UsageBucket


class ReadTxn(Protocol):
    def get(self, table: Table, key: bytes) -> bytes | None: ...

    def scan(
        self,
        table: Table,
        *,
        prefix: bytes = b"",
        after: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` for keys starting with ``prefix`` in key order
        (descending with ``reverse``), starting strictly *after* ``after`` in
        that order when it is given."""
        ...


class WriteTxn(ReadTxn, Protocol):
    def put(self, table: Table, key: bytes, value: bytes) -> None: ...

    def delete(self, table: Table, key: bytes) -> bool: ...


class StoreStatistics(msgspec.Struct, frozen=True):
    kind: str
    path: str | None
    writes: int
    commits: int
    queued_writes: int
    size_bytes: int
    # The map size writes must fit in (0: unbounded, the memory store).
    map_size_bytes: int = 0
    # Writes refused because the store was full (``triogate.errors.StorageFull``).
    full_errors: int = 0


class Store(Protocol):
    def read(self) -> AbstractContextManager[ReadTxn]: ...

    def get_through(self, index: Table, key: bytes, table: Table) -> bytes | None:
        """``table[index[key]]`` in one read snapshot: the key-validation hot
        path's two lookups without the per-call overhead of ``read()``."""
        ...

    def generation(self) -> int:
        """A number that changes whenever anything in the store changed (by
        this process or another one sharing it): what caches of reads
        compare (``control.keycache``). Cheap: read on every key lookup."""
        ...

    async def write(self, fn: Callable[[WriteTxn], T]) -> T: ...

    def statistics(self) -> StoreStatistics: ...


def prefix_successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with
    ``prefix``; None when there is none (empty or all 0xff)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
