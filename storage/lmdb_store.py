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

Opening refuses, with one sentence (``StoreDamaged`` / ``StoreUnavailable``),
a directory it cannot write and a ``data.mdb`` whose header LMDB would trip
on (``lmdb_file.inspect_data_file`` reads it first: a truncated file would
otherwise be a SIGBUS). A write that does not fit in the map size raises
``StorageFull`` (507 ``STORAGE_FULL`` at every boundary), counted in
``statistics().full_errors`` and logged once an hour at most, with what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import lmdb
import outcome
import trio

from triogate.errors import StorageFull, StoreDamaged, StoreUnavailable

from .base import StoreStatistics, Table, prefix_successor
from .lmdb_file import LmdbHeader, inspect_data_file

__all__ = ["LmdbStore", "open_lmdb_store"]

log = logging.getLogger("triogate.storage")

T = TypeVar("T")

DEFAULT_MAP_SIZE = 4 << 30  # virtual reservation; LMDB only uses what it writes
MAX_BATCH = 256  # writes per group commit; bounds the time one commit holds the lock
FULL_LOG_INTERVAL = 3600.0  # a full store is logged once, then at most once an hour


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
    def __init__(
        self,
        path: Path,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
    ) -> None:
        self.path = path
        self.map_size = map_size
        self.header = _prepare(path)
        self._env = _open_env(path, map_size)
        try:
            with self._env.begin(write=True) as txn:
                self._dbs = {t: self._env.open_db(t.value, txn=txn) for t in Table}
        except lmdb.Error as exc:
            self._env.close()
            raise _open_error(path, exc) from exc
        self._send, self._receive = trio.open_memory_channel[_Job](1024)
        self._limiter = trio.CapacityLimiter(1)
        self._writes = 0
        self._commits = 0
        self._full_errors = 0
        self._full_logged_at: float | None = None

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

    def generation(self) -> int:
        # The newest snapshot's transaction id: every commit, by any process
        # on this environment, makes a new one (~0.2 µs).
        txn = self._env.begin(buffers=False)
        try:
            generation: int = txn.id()
            return generation
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
            map_size_bytes=info["map_size"],
            full_errors=self._full_errors,
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
                    except lmdb.MapFullError:
                        # Only this job is rolled back: the parent goes on
                        # (a smaller write of the batch may still fit).
                        child.abort()
                        job.result = outcome.Error(self._full())
                    except _DAMAGE as exc:
                        child.abort()
                        job.result = outcome.Error(_open_error(self.path, exc))
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
            error: BaseException = self._full() if isinstance(exc, lmdb.MapFullError) else exc
            for job in batch:
                job.result = outcome.Error(error)

    def _full(self) -> StorageFull:
        """Count a write refused for want of room, log it (once an hour at
        most: a full store fails every write), and make the error."""
        self._full_errors += 1
        mib = self.map_size >> 20
        now = time.monotonic()
        if self._full_logged_at is None or now - self._full_logged_at >= FULL_LOG_INTERVAL:
            self._full_logged_at = now
            log.error(
                "storage is full: %s has used its whole map (storage.map_size_mb = %d). "
                "Writes are refused (the admin API answers 507 STORAGE_FULL); proxying goes "
                "on and usage is kept in memory and retried. Raise storage.map_size_mb and "
                "restart (a store this full cannot even delete, so purging keys will not "
                "help). Counted in triogate_storage_full_total; logged again in an hour at most",
                self.path,
                mib,
            )
        return StorageFull(f"storage is full (storage.map_size_mb = {mib}): the write was not made")

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


# ---- opening --------------------------------------------------------------


def _prepare(path: Path) -> LmdbHeader | None:
    """Make ``path`` if it is missing (mode 0700), check that this process may
    write there, and read ``data.mdb``'s header before LMDB maps it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the store directory {path}: {exc.strerror}") from exc
    if not path.is_dir():
        raise StoreUnavailable(f"the store path {path} is not a directory")
    # An existing directory keeps its mode: it is the operator's to set.
    for target in (path, path / "data.mdb", path / "lock.mdb"):
        if target.exists() and not os.access(target, os.R_OK | os.W_OK):
            raise StoreUnavailable(
                f"{target} is not writable by this user (uid {os.geteuid()}): the gateway "
                "writes its store there; give the directory and its files to the user "
                "the gateway runs as"
            )
    return inspect_data_file(path)


def _open_env(path: Path, map_size: int) -> lmdb.Environment:
    try:
        return lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=len(Table) + 4,
            subdir=True,
            sync=True,
            metasync=True,
            readahead=False,
            max_readers=512,
        )
    except lmdb.Error as exc:
        raise _open_error(path, exc) from exc


# What LMDB says when pages are not what it wrote.
_DAMAGE = (
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.BadValsizeError,
    lmdb.BadDbiError,
    lmdb.IncompatibleError,
    lmdb.PanicError,
)


def _open_error(path: Path, exc: lmdb.Error) -> Exception:
    """One sentence for why LMDB would not open ``path``."""
    reason = str(exc).split(": ", 1)[-1].rstrip(".")
    if isinstance(exc, lmdb.ReadonlyError) or getattr(exc, "errno", None) in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    ):
        return StoreUnavailable(f"cannot open the store {path} for writing: {reason}")
    if isinstance(exc, _DAMAGE):
        return StoreDamaged(
            f"the store {path} is damaged ({reason}): restore it from a backup "
            "(`triogate doctor` shows what is wrong)"
        )
    return StoreUnavailable(f"cannot open the store {path}: {reason}")
