"""The local replica, sans-IO: recording an admin write, applying changes,
rebuilding from a snapshot. Everything here is a pure function over a store
transaction, run by ``Store.write`` (the LMDB writer thread, or inline in a
``MemoryStore``).

Theory of operation
-------------------
* **Recording.** An admin write is a function over a write transaction.
  ``run_recorded`` hands it a ``RecordingTxn``: reads and writes go to the
  local store (so the function sees its own writes, as always), and every
  put and delete is remembered with the value it replaced. When the function
  wrote a replicated table, all its writes are undone before the
  transaction ends: nothing is visible locally until Redis has accepted the
  change and it comes back as an applied entry. A function that wrote only
  local tables (a usage flush) keeps its writes: it never leaves the node.
* **Where the replica stands** is ``META[b"cluster.position"]``: the
  cluster's id, the sequence number of the last change applied and its
  stream id. It is read in the same transaction that ran the function, so a
  recorded write knows exactly which version of the records it saw; Redis
  accepts it only if no other change came in between (``recordlog``).
* **Applying** a change is idempotent and ordered: a change at or below the
  position is skipped, the next one is applied, a later one (a gap: entries
  were trimmed from the stream before this node read them) raises ``Gap``
  and the node rebuilds from a snapshot instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Generic, TypeVar

import msgspec

from triogate.cluster.tables import REPLICATED_TABLES, Change, Mutation, is_replicated
from triogate.storage import ReadTxn, Table, WriteTxn

__all__ = [
    "NODE_KEY",
    "POSITION_KEY",
    "Gap",
    "Position",
    "Recorded",
    "RecordingTxn",
    "apply_change",
    "apply_own",
    "export_replicated",
    "has_replicated_records",
    "read_position",
    "rebuild",
    "run_recorded",
    "write_position",
]

T = TypeVar("T")

POSITION_KEY: Final = b"cluster.position"
NODE_KEY: Final = b"cluster.node"


class Position(msgspec.Struct, frozen=True, array_like=True):
    """Where a replica stands: the cluster it belongs to, the sequence
    number of the last change it applied (0: none) and that change's stream
    id (``b"0-0"``: from the stream's start)."""

    cluster: str
    seq: int
    stream_id: bytes


_position_decoder = msgspec.msgpack.Decoder(Position)
_encoder = msgspec.msgpack.Encoder()


class Gap(Exception):
    """A change that does not follow the replica's position: the entries in
    between were trimmed from the stream (or the cluster is another one).
    Never leaves the cluster package: the replicator rebuilds."""


def read_position(txn: ReadTxn) -> Position | None:
    raw = txn.get(Table.META, POSITION_KEY)
    return None if raw is None else _position_decoder.decode(raw)


def write_position(txn: WriteTxn, position: Position) -> None:
    txn.put(Table.META, POSITION_KEY, _encoder.encode(position))


class RecordingTxn:
    """A ``WriteTxn`` over another that remembers every put and delete (and
    the value each replaced, to undo them)."""

    __slots__ = ("_txn", "local", "shared", "undo")

    def __init__(self, txn: WriteTxn) -> None:
        self._txn = txn
        self.shared: list[Mutation] = []
        self.local: list[Mutation] = []
        self.undo: list[tuple[Table, bytes, bytes | None]] = []

    def get(self, table: Table, key: bytes) -> bytes | None:
        return self._txn.get(table, key)

    def scan(
        self,
        table: Table,
        *,
        prefix: bytes = b"",
        after: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        return self._txn.scan(table, prefix=prefix, after=after, reverse=reverse)

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        self._remember(table, key, value)
        self._txn.put(table, key, value)

    def delete(self, table: Table, key: bytes) -> bool:
        self._remember(table, key, None)
        return self._txn.delete(table, key)

    def _remember(self, table: Table, key: bytes, value: bytes | None) -> None:
        self.undo.append((table, key, self._txn.get(table, key)))
        (self.shared if is_replicated(table, key) else self.local).append((table, key, value))

    def rollback(self) -> None:
        """Put back every value this transaction replaced, newest first."""
        for table, key, old in reversed(self.undo):
            if old is None:
                self._txn.delete(table, key)
            else:
                self._txn.put(table, key, old)
        self.undo.clear()


class Recorded(msgspec.Struct, Generic[T]):
    """What running an admin write against the replica gave: its result,
    the replicated mutations it wants (empty: a local-only write, already
    kept), the local ones that go with them, and the replica's position
    when it ran (None: this replica has not joined a cluster yet)."""

    result: T
    shared: list[Mutation]
    local: list[Mutation]
    position: Position | None


def run_recorded(fn: Callable[[Any], T], txn: WriteTxn) -> Recorded[T]:
    """Run ``fn`` over ``txn`` and record it (see the module docstring). An
    exception from ``fn`` propagates: the store rolls the write back."""
    position = read_position(txn)
    recording = RecordingTxn(txn)
    result = fn(recording)
    if not recording.shared:
        return Recorded(result, [], [], position)
    recording.rollback()
    return Recorded(result, recording.shared, recording.local, position)


def _apply(txn: WriteTxn, mutations: Iterable[Mutation]) -> None:
    for table, key, value in mutations:
        if value is None:
            txn.delete(table, key)
        else:
            txn.put(table, key, value)


def apply_change(txn: WriteTxn, cluster: str, seq: int, stream_id: bytes, change: Change) -> bool:
    """Apply the change numbered ``seq``: True if applied, False if the
    replica had it already; ``Gap`` if changes before it are missing."""
    position = read_position(txn)
    current = 0 if position is None or position.cluster != cluster else position.seq
    if position is not None and position.cluster != cluster:
        raise Gap(f"the replica belongs to cluster {position.cluster}, not {cluster}")
    if seq <= current:
        return False
    if seq != current + 1:
        raise Gap(f"change {seq} follows {current}: changes in between are gone")
    _apply(txn, change.applicable())
    write_position(txn, Position(cluster, seq, stream_id))
    return True


def apply_own(
    txn: WriteTxn,
    cluster: str,
    seq: int,
    stream_id: bytes,
    shared: Sequence[Mutation],
    local: Sequence[Mutation],
) -> None:
    """Apply a change this node wrote, once Redis accepted it as ``seq``
    (read-your-writes: the admin write returns after this). The replicator
    may have applied it already (then only the local mutations are left);
    if the replica is behind, the replicator brings it there in order."""
    position = read_position(txn)
    current = 0 if position is None or position.cluster != cluster else position.seq
    if seq == current + 1:
        _apply(txn, shared)
        write_position(txn, Position(cluster, seq, stream_id))
    _apply(txn, local)


def has_replicated_records(txn: ReadTxn) -> bool:
    """Whether this store holds any shared record (a node with records of
    its own must not join a cluster that has others: they would be lost)."""
    return next(export_replicated(txn), None) is not None


def export_replicated(txn: ReadTxn) -> Iterator[tuple[Table, bytes, bytes]]:
    """Every shared record of this store (seeding a new cluster from it)."""
    for table in sorted(REPLICATED_TABLES, key=lambda t: t.value):
        for key, value in txn.scan(table):
            if is_replicated(table, key):
                yield table, key, value


def rebuild(
    txn: WriteTxn,
    position: Position,
    records: Mapping[Table, Mapping[bytes, bytes]],
) -> int:
    """Replace every shared record of the replica by ``records`` (a
    snapshot of the cluster at ``position`` or later: the changes after
    ``position`` are applied again on top, which converges because they are
    absolute). Returns the number of records written."""
    for table in REPLICATED_TABLES:
        stale = [k for k, _ in txn.scan(table) if is_replicated(table, k)]
        for key in stale:
            txn.delete(table, key)
    written = 0
    for table, rows in records.items():
        if table not in REPLICATED_TABLES:
            continue
        for key, value in rows.items():
            if is_replicated(table, key):
                txn.put(table, key, value)
                written += 1
    write_position(txn, position)
    return written
