"""The LMDB ``Store``: one environment in ``data_dir``, one sub-database a table.

Theory of operation
-------------------
LMDB allows one writer at a time (across processes too: the CLI may write while
a server runs) and any number of lock-free readers. So:

* reads open a short read transaction inline on the trio thread (~1 µs);
* writes are queued on a memory channel to the store's *writer task*. The
  writer takes everything that is queued, runs the functions one after another
  inside a single LMDB write transaction on a worker thread (behind a
  ``CapacityLimiter(1)``), each in its own nested child transaction so that one
  that raises is rolled back alone, and commits once. LMDB's commit is an fsync
  (``sync=True``), so when ``await store.write(fn)`` returns the write is on
  disk: an acknowledged admin write survives a SIGKILL at any moment.

A durable commit costs ~380 µs here; group commit spreads it over every write
that queued up meanwhile instead of paying it per write.

The writer task lives in a nursery owned by ``open_lmdb_store``; leaving the
context drains queued writes, then closes the environment.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import lmdb
import outcome
import trio

from .base import StoreStatistics, Table, prefix_successor

__all__ = ["LmdbStore", "open_lmdb_store"]

T = TypeVar("T")

DEFAULT_MAP_SIZE = 4 << 30  # virtual reservation; LMDB only uses what it writes
MAX_BATCH = 256  # writes per group commit; bounds the time one commit holds the lock


class _LmdbTxn:
    """Adapts an ``lmdb.Transaction`` to ``ReadTxn`` / ``WriteTxn``.

    It is its own context manager (a class, not ``@contextmanager``: on the
    key-validation hot path the generator machinery cost more than LMDB)."""

    __slots__ = ("_dbs", "_txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[Table, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    def __enter__(self) -> _LmdbTxn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._txn.abort()

    def get(self, table: Table, key: bytes) -> bytes | None:
        # Transactions are opened with buffers=False: values are bytes.
        return cast("bytes | None", self._txn.get(key, db=self._dbs[table]))

    def scan(
        self,
        table: Table,
        *,
        prefix: bytes = b"",
        after: bytes | None = None,
        reverse: bool = False,
    ) -> Iterator[tuple[bytes, bytes]]:
        with self._txn.cursor(db=self._dbs[table]) as cur:
            if reverse:
                bound = after if after is not None else prefix_successor(prefix)
                # Position on the first key >= bound, then step back once: the
                # result is the last key < bound (or the last key of all).
                positioned = cur.set_range(bound) if bound is not None else False
                ok = cur.prev() if positioned else cur.last()
                while ok:
                    key = cast(bytes, cur.key())
                    if not key.startswith(prefix):
                        if key < prefix:
                            return
                    else:
                        yield key, cast(bytes, cur.value())
                    ok = cur.prev()
            else:
                start = prefix if after is None or after < prefix else after
                ok = cur.set_range(start)
                if ok and after is not None and cur.key() == after:
                    ok = cur.next()
                while ok:
                    key = cast(bytes, cur.key())
                    if not key.startswith(prefix):
                        return
                    yield key, cast(bytes, cur.value())
                    ok = cur.next()

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._dbs[table])

    def delete(self, table: Table, key: bytes) -> bool:
        deleted: bool = self._txn.delete(key, db=self._dbs[table])
        return deleted


class _Job:
    __slots__ = ("done", "fn", "result")

    def __init__(self, fn: Callable[[_LmdbTxn], Any]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: outcome.Outcome[Any] | None = None


class LmdbStore:
    def __init__(self, path: Path, *, map_size: int = DEFAULT_MAP_SIZE) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        self.path = path
        self._env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=len(Table) + 4,
            subdir=True,
            sync=True,
            metasync=True,
            readahead=False,
            max_readers=512,
        )
        with self._env.begin(write=True) as txn:
            self._dbs = {t: self._env.open_db(t.value, txn=txn) for t in Table}
        self._send, self._receive = trio.open_memory_channel[_Job](1024)
        self._limiter = trio.CapacityLimiter(1)
        self._writes = 0
        self._commits = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<LmdbStore {self.path} {s.commits} commits for {s.writes} writes, "
            f"{s.queued_writes} queued>"
        )

    def read(self) -> _LmdbTxn:
        """A read snapshot, for use in ``with``: ``with store.read() as txn``."""
        return _LmdbTxn(self._env.begin(buffers=False), self._dbs)

    def get_through(self, index: Table, key: bytes, table: Table) -> bytes | None:
        dbs = self._dbs
        txn = self._env.begin(buffers=False)
        try:
            found = txn.get(key, db=dbs[index])
            if found is None:
                return None
            raw: bytes | None = txn.get(found, db=dbs[table])
            return raw
        finally:
            txn.abort()

    async def write(self, fn: Callable[[_LmdbTxn], T]) -> T:
        job = _Job(fn)
        await self._send.send(job)
        await job.done.wait()
        assert job.result is not None
        result: T = job.result.unwrap()
        return result

    def statistics(self) -> StoreStatistics:
        info = self._env.info()
        stat = self._env.stat()
        return StoreStatistics(
            kind="lmdb",
            path=str(self.path),
            writes=self._writes,
            commits=self._commits,
            queued_writes=self._send.statistics().current_buffer_used,
            size_bytes=(info["last_pgno"] + 1) * stat["psize"],
        )

    async def run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The one writer: group-commit whatever is queued, until the channel closes."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                # Shielded: a cancelled caller must not tear a commit in half.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._commit, batch, limiter=self._limiter)
                for job in batch:
                    job.done.set()

    def _commit(self, batch: list[_Job]) -> None:
        try:
            with self._env.begin(write=True) as parent:
                for job in batch:
                    child = self._env.begin(write=True, parent=parent)
                    try:
                        value = job.fn(_LmdbTxn(child, self._dbs))
                    except BaseException as exc:
                        child.abort()
                        job.result = outcome.Error(exc)
                    else:
                        child.commit()
                        job.result = outcome.Value(value)
            self._commits += 1
            self._writes += sum(isinstance(j.result, outcome.Value) for j in batch)
        except lmdb.Error as exc:
            # The commit itself failed (disk full, map full): nothing of the
            # batch is durable, so every job must hear about it.
            for job in batch:
                job.result = outcome.Error(exc)

    def close(self) -> None:
        self._env.close()


@asynccontextmanager
async def open_lmdb_store(
    path: Path, *, map_size: int = DEFAULT_MAP_SIZE
) -> AsyncIterator[LmdbStore]:
    store = LmdbStore(path, map_size=map_size)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_writer)
            try:
                yield store
            finally:
                # Closing the send side lets the writer drain what is queued
                # and return; the nursery waits for it.
                store._send.close()
    except BaseExceptionGroup as group:
        # The writer never fails on its own (errors go back to the job that
        # caused them), so a group here holds what the *caller's* block
        # raised: give the caller back its own exception, not a wrapper.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        store.close()
