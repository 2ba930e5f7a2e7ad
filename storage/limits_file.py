"""The workers' shared limiter environment: ``<data_dir>/limits/``.

With ``server.workers > 1`` every rate-limit and credit decision is one
write transaction in this LMDB environment (``triogate.dataplane.sharedlimits``),
so it is exact across the worker processes: LMDB serialises writers across
processes with a robust mutex.

It is a separate environment from the store (``lmdb/``) because it has other
rules:

* **no fsync** (``sync=False, metasync=False``): a commit is a write into
  the page cache, about a microsecond. A killed process loses nothing (the
  kernel has the pages); an operating-system crash may lose the last
  decisions, which only forgets limiter state (a burst comes back whole).
  Credit balances are also flushed into the store with the usage counters.
* **disposable**: what it holds is recomputed from nothing (limits start
  whole) or from the store (balances as last flushed). So a damaged or
  unreadable environment, or one too full to write in, is not an error:
  ``open_limits_env`` logs a warning and starts it afresh, and the
  data-directory checks leave it alone.
* **only for workers**: a gateway that decides in one process
  (``server.workers = 1``, the standalone ASGI app) spends balances this
  table does not see, so it removes the table at start
  (``discard_limits_env``): a later start with workers must not find the
  balances it holds (it would hand spent credits out again).

Opening is serialised across processes with ``flock`` on the data directory
itself, so two workers starting together never both recreate it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import lmdb

from triogate.errors import StoreError
from triogate.storage.lmdb_file import DATA_FILE, inspect_data_file

__all__ = [
    "LIMITS_DIR",
    "LIMITS_MAP_SIZE",
    "discard_limits_env",
    "limits_path",
    "open_limits_env",
    "used_share",
]

log = logging.getLogger("triogate.storage.limits")

LIMITS_DIR: Final = "limits"
#: Reserved on disk (see ``_open``): an entry takes about 100 bytes with
#: the tree's overhead, so some 600,000 limiter states fit; past that,
#: ``sharedlimits`` prunes and, if need be, forgets them.
LIMITS_MAP_SIZE: Final = 64 << 20
#: What the write check at open puts and deletes (no table's key starts with NUL).
_PROBE: Final = b"\x00open"
#: A table using this share of its map at open is started afresh: the running
#: sweeper keeps it well below (``dataplane.sharedtable.ROOM_AT``), so it was
#: left full, and making room in a full map needs free pages too.
FULL_AT: Final = 0.9


def _pages(stat: dict[str, int]) -> int:
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def used_share(env: Any, dbs: Sequence[Any]) -> float:
    """The share of ``env``'s map the trees of ``dbs`` (and the main tree)
    use; pages freed by deletions are reused, so they do not count."""
    with env.begin() as txn:
        pages = _pages(env.stat()) + sum(_pages(txn.stat(db)) for db in dbs)
    share: float = pages * env.stat()["psize"] / env.info()["map_size"]
    return share


def limits_path(data_dir: Path) -> Path:
    return data_dir / LIMITS_DIR


def _open(
    path: Path, map_size: int, names: Sequence[bytes], *, writemap: bool = True
) -> tuple[Any, list[Any]]:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = lmdb.open(
        str(path),
        map_size=map_size,
        max_dbs=len(names) + 1,
        subdir=True,
        sync=False,
        metasync=False,
        readahead=False,
        max_readers=512,
        # Dirty pages are written in place in the map, not copied out with a
        # write() per commit: a commit costs ~1 µs instead of ~5.
        writemap=writemap,
    )
    try:
        if writemap:
            # With writemap, writing a page of the (sparse) file that the
            # disk has no room for is a SIGBUS: reserve the map up front, so
            # a full disk is an OSError here, not a dead worker.
            fd = os.open(path / DATA_FILE, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, map_size)
            finally:
                os.close(fd)
        dbs = [env.open_db(name) for name in names]
        # Read every table once: a damaged tree fails here, not mid-request.
        with env.begin() as txn:
            for db in dbs:
                cursor = txn.cursor(db=db)
                cursor.first()
                cursor.last()
        # And write once: a map left full (MapFullError, or nearly) is
        # started afresh too.
        with env.begin(write=True, db=dbs[0]) as txn:
            txn.put(_PROBE, b"")
            txn.delete(_PROBE)
        if used_share(env, dbs) >= FULL_AT:
            raise StoreError(f"it is {used_share(env, dbs):.0%} full")
    except BaseException:
        env.close()
        raise
    return env, dbs


def _open_or_fall_back(path: Path, map_size: int, names: Sequence[bytes]) -> tuple[Any, list[Any]]:
    try:
        return _open(path, map_size, names)
    except OSError as exc:  # no room to reserve the map (lmdb.Error is not an OSError)
        log.warning(
            "cannot reserve %d MiB for the shared limiter state in %s (%s); using it "
            "without a reserved map (each decision costs a write)",
            map_size >> 20,
            path,
            exc.strerror,
        )
        return _open(path, map_size, names, writemap=False)


def open_limits_env(
    data_dir: Path, names: Sequence[bytes], *, map_size: int = LIMITS_MAP_SIZE
) -> tuple[Any, list[Any]]:
    """The environment and its named tables, recreated empty (with a
    warning) when what is there cannot be opened or read."""
    path = limits_path(data_dir)
    lock = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # LMDB trusts the file: a truncated one would be a SIGBUS.
            inspect_data_file(path)
            return _open_or_fall_back(path, map_size, names)
        except (StoreError, lmdb.Error, OSError) as exc:
            log.warning(
                "the shared limiter state in %s could not be used (%s); starting it afresh: "
                "rate limits start whole, credit balances come from the store",
                path,
                exc,
            )
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # not a directory, or not ours to remove
            path.unlink()
        return _open_or_fall_back(path, map_size, names)
    finally:
        os.close(lock)  # releases the flock


def discard_limits_env(data_dir: Path) -> None:
    """Remove the shared table, if there is one (under the same ``flock``
    as opening): called where one process decides, since the balances it
    holds would go stale (see the module's doc)."""
    path = limits_path(data_dir)
    if not path.exists():
        return
    lock = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # not a directory
            path.unlink()
    finally:
        os.close(lock)
