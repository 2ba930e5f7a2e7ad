"""The two stores behave the same: ordered scans, atomic writes, durability."""

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from triogate.storage import MemoryStore, Store, Table, WriteTxn, open_lmdb_store
from triogate.storage.base import prefix_successor


@asynccontextmanager
async def make_store(kind: str, path: Path) -> AsyncIterator[Store]:
    if kind == "memory":
        yield MemoryStore()
    else:
        async with open_lmdb_store(path) as store:
            yield store


KINDS = ["memory", "lmdb"]


async def fill(store: Store) -> None:
    def fn(txn: WriteTxn) -> None:
        for i in range(10):
            txn.put(Table.KEYS, b"k%02d" % i, b"v%d" % i)
        txn.put(Table.KEYS, b"j", b"before")
        txn.put(Table.KEYS, b"l", b"after")

    await store.write(fn)


@pytest.mark.parametrize("kind", KINDS)
async def test_scans(kind: str, tmp_path: Path) -> None:
    async with make_store(kind, tmp_path) as store:
        await fill(store)
        with store.read() as txn:

            def keys(**kw: object) -> list[bytes]:
                return [k for k, _ in txn.scan(Table.KEYS, **kw)]  # type: ignore[arg-type]

            assert keys(prefix=b"k") == [b"k%02d" % i for i in range(10)]
            assert keys(prefix=b"k", reverse=True) == [b"k%02d" % i for i in range(9, -1, -1)]
            assert keys(prefix=b"k", after=b"k05") == [b"k06", b"k07", b"k08", b"k09"]
            assert keys(prefix=b"k", after=b"k05", reverse=True) == [
                b"k04",
                b"k03",
                b"k02",
                b"k01",
                b"k00",
            ]
            assert keys(prefix=b"k", after=b"k00", reverse=True) == []
            assert keys(reverse=True)[:2] == [b"l", b"k09"]
            assert keys(prefix=b"zz") == []
            assert keys(prefix=b"zz", reverse=True) == []
            assert txn.get(Table.KEYS, b"k03") == b"v3"
            assert txn.get(Table.KEYS, b"nope") is None
            assert txn.get(Table.USAGE, b"k03") is None  # tables are separate


@pytest.mark.parametrize("kind", KINDS)
async def test_failed_write_rolls_back_alone(kind: str, tmp_path: Path) -> None:
    async with make_store(kind, tmp_path) as store:
        await fill(store)

        def bad(txn: WriteTxn) -> None:
            txn.put(Table.KEYS, b"k99", b"x")
            txn.delete(Table.KEYS, b"k00")
            txn.put(Table.KEYS, b"k01", b"changed")
            raise RuntimeError("boom")

        def good(txn: WriteTxn) -> str:
            txn.put(Table.KEYS, b"k50", b"ok")
            return "done"

        results: dict[str, object] = {}

        async def run(name: str, fn: object) -> None:
            try:
                results[name] = await store.write(fn)  # type: ignore[arg-type]
            except RuntimeError as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "bad", bad)
            nursery.start_soon(run, "good", good)
        assert isinstance(results["bad"], RuntimeError)
        assert results["good"] == "done"
        with store.read() as txn:
            assert txn.get(Table.KEYS, b"k99") is None
            assert txn.get(Table.KEYS, b"k00") == b"v0"
            assert txn.get(Table.KEYS, b"k01") == b"v1"
            assert txn.get(Table.KEYS, b"k50") == b"ok"


async def test_lmdb_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    async with open_lmdb_store(tmp_path) as store:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(
                    store.write, lambda txn, i=i: txn.put(Table.KEYS, b"%05d" % i, b"v")
                )
        stats = store.statistics()
        assert stats.writes == 200
        # Writes that queue up while a commit runs share the next commit.
        assert stats.commits < 200
        assert "commits for 200 writes" in repr(store)


async def test_lmdb_write_is_durable_across_reopen(tmp_path: Path) -> None:
    async with open_lmdb_store(tmp_path) as store:
        await store.write(lambda txn: txn.put(Table.AUDIT, b"a", b"1"))
    async with open_lmdb_store(tmp_path) as store:
        with store.read() as txn:
            assert txn.get(Table.AUDIT, b"a") == b"1"


async def test_lmdb_another_process_writes_while_open(tmp_path: Path) -> None:
    """The CLI and a server open the same environment; LMDB coordinates them."""
    script = (
        "import sys, trio, pathlib\n"
        "from triogate.storage import open_lmdb_store, Table\n"
        "async def main():\n"
        "    async with open_lmdb_store(pathlib.Path(sys.argv[1])) as s:\n"
        "        await s.write(lambda t: t.put(Table.META, b'x', b'from-other'))\n"
        "trio.run(main)\n"
    )
    async with open_lmdb_store(tmp_path) as store:
        await store.write(lambda txn: txn.put(Table.META, b"mine", b"1"))
        await trio.run_process([sys.executable, "-c", script, str(tmp_path)])
        with store.read() as txn:
            assert txn.get(Table.META, b"x") == b"from-other"
            assert txn.get(Table.META, b"mine") == b"1"


def test_prefix_successor() -> None:
    assert prefix_successor(b"ab") == b"ac"
    assert prefix_successor(b"a\xff") == b"b"
    assert prefix_successor(b"\xff\xff") is None
    assert prefix_successor(b"") is None
