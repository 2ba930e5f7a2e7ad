"""An in-memory ``Store`` for unit tests: same semantics, no disk.

Each table is a dict plus a sorted list of its keys (bisect), so scans page
exactly like LMDB. A write function runs inline (trio is single-threaded, so
nothing interleaves with it) and an undo log restores every table it touched
if it raises, which gives the same all-or-nothing rule as the LMDB store.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TypeVar

import trio

from .base import StoreStatistics, Table

__all__ = ["MemoryStore"]

T = TypeVar("T")


class _MemoryTable:
    __slots__ = ("data", "order")

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.order: list[bytes] = []

    def put(self, key: bytes, value: bytes) -> None:
        if key not in self.data:
            bisect.insort(self.order, key)
        self.data[key] = value

    def delete(self, key: bytes) -> bool:
        if key not in self.data:
            return False
        del self.data[key]
        del self.order[bisect.bisect_left(self.order, key)]
        return True


class _MemoryTxn:
    def __init__(
        self,
        tables: dict[Table, _MemoryTable],
        undo: list[tuple[Table, bytes, bytes | None]] | None,
    ) -> None:
        self._tables = tables
        self._undo = undo

    def __enter__(self) -> _MemoryTxn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def get(self, table: Table, key: bytes) -> bytes | None:
        return self._tables[table].data.get(key)

    def scan(
        self,
        table: Table,
        *,
        prefix: bytes = b"",
        after: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        t = self._tables[table]
        # Snapshot the key order so that a caller may write while iterating.
        order = list(t.order)
        if reverse:
            hi = len(order) if after is None else bisect.bisect_left(order, after)
            for i in range(hi - 1, -1, -1):
                key = order[i]
                if not key.startswith(prefix):
                    if key < prefix:
                        return
                    continue
                yield key, t.data[key]
        else:
            lo = bisect.bisect_left(order, prefix)
            if after is not None:
                lo = max(lo, bisect.bisect_right(order, after))
            for key in order[lo:]:
                if not key.startswith(prefix):
                    return
                yield key, t.data[key]

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        assert self._undo is not None, "read transaction"
        self._undo.append((table, key, self._tables[table].data.get(key)))
        self._tables[table].put(key, value)

    def delete(self, table: Table, key: bytes) -> bool:
        assert self._undo is not None, "read transaction"
        old = self._tables[table].data.get(key)
        self._undo.append((table, key, old))
        return self._tables[table].delete(key)


class MemoryStore:
    def __init__(self) -> None:
        self._tables = {table: _MemoryTable() for table in Table}
        self._writes = 0

    def __repr__(self) -> str:
        rows = sum(len(t.data) for t in self._tables.values())
        return f"<MemoryStore {rows} rows, {self._writes} writes>"

    def read(self) -> _MemoryTxn:
        return _MemoryTxn(self._tables, None)

    def get_through(self, index: Table, key: bytes, table: Table) -> bytes | None:
        found = self._tables[index].data.get(key)
        return None if found is None else self._tables[table].data.get(found)

    def generation(self) -> int:
        return self._writes

    async def write(self, fn: Callable[[_MemoryTxn], T]) -> T:
        await trio.lowlevel.checkpoint()
        undo: list[tuple[Table, bytes, bytes | None]] = []
        try:
            result = fn(_MemoryTxn(self._tables, undo))
        except BaseException:
            for table, key, old in reversed(undo):
                if old is None:
                    self._tables[table].delete(key)
                else:
                    self._tables[table].put(key, old)
            raise
        self._writes += 1
        return result

    def statistics(self) -> StoreStatistics:
        size = sum(len(k) + len(v) for t in self._tables.values() for k, v in t.data.items())
        return StoreStatistics(
            kind="memory",
            path=None,
            writes=self._writes,
            commits=self._writes,
            queued_writes=0,
            size_bytes=size,
        )
