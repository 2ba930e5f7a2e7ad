"""Which records a cluster shares, and how a change to them travels.

Theory of operation
-------------------
A table is either **replicated** (Redis holds the truth: every node's LMDB is
a replica of it, and every write to it is an admin write that Redis must
accept first) or **local** (each node's own: live usage counters, which the
cluster aggregates elsewhere, and this node's bookkeeping). The two sets are
declared here and nowhere else; ``tests/test_cluster_tables.py`` fails when
a table of ``storage.base.Table`` is in neither, so a table added later has
to be classified on purpose (an unclassified one is treated as local).

``META`` is replicated except for the keys that describe this node's copy:
the data-directory marker (its own store id) and the ``cluster.`` keys
(where this replica stands in the change stream).

A **change** is the list of puts and deletes one admin write made
(``Mutation``: table, key, value or None for a delete), in order; values are
absolute, so applying a change twice, or applying it over a snapshot taken
while it was being made, leaves the same state.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import msgspec

from triogate.storage import Table

__all__ = [
    "LOCAL_META_KEYS",
    "LOCAL_META_PREFIX",
    "LOCAL_TABLES",
    "REPLICATED_TABLES",
    "Change",
    "Mutation",
    "decode_change",
    "encode_change",
    "is_replicated",
    "table_named",
]

#: Tables whose truth is in Redis. The integration adds issue 13's tables
#: here (or to LOCAL_TABLES) as they land.
REPLICATED_TABLES: Final[frozenset[Table]] = frozenset(
    {
        Table.KEYS,
        Table.KEY_DIGESTS,
        Table.KEY_OWNERS,
        Table.ADMINS,
        Table.ADMIN_DIGESTS,
        Table.AUDIT,
        Table.META,
        Table.IDENTITIES,
        Table.IDENTITY_EXTERNAL_IDS,
        Table.IDENTITY_KEYS,
        Table.PLANS,
        Table.PLAN_MEMBERS,
        Table.ROLES,
        Table.ROLE_NAMES,
        Table.ROLE_MEMBERS,
        # Issue 13: keys imported by their SHA-256 validate on every node.
        Table.KEY_SHA256,
        Table.KEY_IMPORTS,
    }
)

#: Tables each node keeps for itself: live usage counters and balances
#: (the cluster decides limits and credits in Redis and aggregates usage),
#: and its webhook deliveries.
LOCAL_TABLES: Final[frozenset[Table]] = frozenset(
    {
        Table.USAGE,
        Table.USAGE_HISTORY,  # this node's flushes' buckets (issue 13)
        # Issue 13's webhook outbox: an event enqueued by an admin write is a
        # local mutation of that write, applied on the node that made it
        # only, so it is delivered once per cluster (``replica.apply_own``).
        Table.EVENT_DELIVERIES,
        Table.EVENT_OUTBOX,
        Table.EVENT_MARKS,
    }
)

#: META keys that belong to this node's copy, never shared.
LOCAL_META_KEYS: Final[frozenset[bytes]] = frozenset({b"datadir"})
LOCAL_META_PREFIX: Final = b"cluster."

Mutation = tuple[Table, bytes, bytes | None]


def is_replicated(table: Table, key: bytes) -> bool:
    """Whether a put or delete of ``table[key]`` is a cluster write."""
    if table is Table.META:
        return key not in LOCAL_META_KEYS and not key.startswith(LOCAL_META_PREFIX)
    return table in REPLICATED_TABLES


_BY_NAME: Final = {t.value: t for t in Table}


def table_named(name: bytes) -> Table | None:
    """The table stored under ``name``, or None (a table this version does
    not know: written by a newer node)."""
    return _BY_NAME.get(name)


class Change(msgspec.Struct, frozen=True, array_like=True):
    """One admin write as it travels: who made it, when (unix seconds), and
    its mutations as ``[table name, key, value or None]``."""

    node: str
    at: float
    mutations: list[tuple[bytes, bytes, bytes | None]]

    def applicable(self) -> Iterable[Mutation]:
        """The mutations this node can apply, in order: tables it does not
        know (a newer node's) and keys local to each node are skipped."""
        for name, key, value in self.mutations:
            table = table_named(name)
            if table is not None and is_replicated(table, key):
                yield table, key, value


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Change)


def encode_change(node: str, at: float, mutations: Sequence[Mutation]) -> bytes:
    return _encoder.encode(Change(node, at, [(t.value, k, v) for t, k, v in mutations]))


def decode_change(raw: bytes) -> Change:
    """Raises ``msgspec.DecodeError`` for bytes that are not a change."""
    return _decoder.decode(raw)
