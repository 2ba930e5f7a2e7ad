"""Records shared through a real Redis, in-process: nodes over MemoryStores
(and their follower tasks) against a real ``redis-server``: a write made on
one node reaches the others, concurrent writes are serialized (optimistic
concurrency), Redis lost means 503 and recovery, a replica that fell behind
the stream's trim point rebuilds, the secrets check. Also measures the
propagation delay (printed, never asserted beyond the issue's 1 s bound)."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from tests.redis_fixture import RedisServer, running_redis
from triogate.cluster.follower import Follower
from triogate.cluster.membership import Heartbeat, list_nodes
from triogate.cluster.recordlog import RecordLog
from triogate.cluster.redis import open_redis
from triogate.cluster.replica import read_position
from triogate.cluster.status import ReplicaState, ReplicaStatus
from triogate.cluster.store import ClusterStore
from triogate.config import ClusterConfig
from triogate.errors import Conflict, SecretsError, StoreUnavailable, StoreUnreachable
from triogate.storage import MemoryStore, Table, WriteTxn

FINGERPRINTS = {"hmac": {1: "aa" * 16}, "encryption": {1: "bb" * 16}}
POLL = 0.005


@pytest.fixture(name="redis")
def _redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@dataclass
class Node:
    name: str
    local: MemoryStore
    store: ClusterStore
    follower: Follower
    status: ReplicaStatus
    log: RecordLog
    beat: Heartbeat

    def get(self, table: Table, key: bytes) -> bytes | None:
        with self.store.read() as txn:
            return txn.get(table, key)


@asynccontextmanager
async def node(
    url: str,
    name: str,
    *,
    fingerprints: dict[str, dict[int, str]] = FINGERPRINTS,
    local: MemoryStore | None = None,
    stream_length: int = 10_000,
    follow: bool = True,
) -> AsyncIterator[Node]:
    async with open_redis(ClusterConfig(redis_url=url), health=False) as link:
        log = RecordLog(link.client, stream_length=stream_length)
        local = MemoryStore() if local is None else local
        status = ReplicaStatus(name, trio.current_time)
        follower = Follower(local, log, status, lambda: fingerprints)
        await follower.join()
        store = ClusterStore(local, log, follower, name)
        beat = Heartbeat(log, status)
        async with trio.open_nursery() as nursery:
            if follow:
                await nursery.start(follower.run)
                await nursery.start(beat.run)
            yield Node(name, local, store, follower, status, log, beat)
            nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], bound: float = 5.0) -> None:
    """Poll until ``predicate()``, at most ``bound`` seconds."""
    with trio.fail_after(bound):
        while not predicate():  # noqa: ASYNC110 (state in another task's store)
            await trio.sleep(POLL)


def put(table: Table, key: bytes, value: bytes, txn: WriteTxn) -> str:
    txn.put(table, key, value)
    return "ok"


def setup_once(admin: bytes, txn: WriteTxn) -> bytes:
    if txn.get(Table.META, b"setup") is not None:
        raise Conflict("setup has already been done")
    txn.put(Table.META, b"setup", admin)
    txn.put(Table.ADMINS, admin, b"record")
    return admin


async def test_a_write_on_one_node_reaches_the_others(redis: RedisServer) -> None:
    url = redis.url
    async with node(url, "a") as a, node(url, "b") as b:
        assert a.status.cluster_id == b.status.cluster_id is not None
        assert await a.store.write(partial(put, Table.KEYS, b"k1", b"v1")) == "ok"
        # Read-your-writes: on the writing node at once.
        assert a.get(Table.KEYS, b"k1") == b"v1"
        await until(lambda: b.get(Table.KEYS, b"k1") == b"v1")
        # Deletes travel too; a local-only write does not.
        await b.store.write(lambda txn: txn.delete(Table.KEYS, b"k1"))
        await b.store.write(partial(put, Table.USAGE, b"k1", b"mine"))
        await until(lambda: a.get(Table.KEYS, b"k1") is None)
        assert a.get(Table.USAGE, b"k1") is None and b.get(Table.USAGE, b"k1") == b"mine"
        assert a.status.applied_seq == b.status.applied_seq == 2


async def test_setup_is_once_per_cluster_even_when_concurrent(redis: RedisServer) -> None:
    url = redis.url
    async with node(url, "a") as a, node(url, "b") as b:
        results: list[object] = []

        async def attempt(n: Node, admin: bytes) -> None:
            try:
                results.append(await n.store.write(partial(setup_once, admin)))
            except Conflict as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(attempt, a, b"adm_a%d" % i)
                nursery.start_soon(attempt, b, b"adm_b%d" % i)
        winners = [r for r in results if isinstance(r, bytes)]
        assert len(winners) == 1 and len(results) == 6
        await until(lambda: a.get(Table.META, b"setup") == b.get(Table.META, b"setup"))
        assert a.get(Table.META, b"setup") == winners[0]
        assert a.store.conflicts + b.store.conflicts >= 1


async def test_concurrent_increments_lose_nothing(redis: RedisServer) -> None:
    url = redis.url

    # Read-modify-write from two nodes at once: the commit's version check
    # makes every increment count.
    def increment(txn: WriteTxn) -> int:
        value = int(txn.get(Table.META, b"counter") or b"0") + 1
        txn.put(Table.META, b"counter", str(value).encode())
        return value

    async with node(url, "a") as a, node(url, "b") as b:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(a.store.write, increment)
                nursery.start_soon(b.store.write, increment)
        await until(lambda: a.get(Table.META, b"counter") == b.get(Table.META, b"counter") == b"20")


async def test_redis_lost_refuses_writes_and_recovers(redis: RedisServer) -> None:
    redis.stop()
    redis.persistence = True
    redis.start()
    async with node(redis.url, "a") as a, node(redis.url, "b") as b:
        await a.store.write(partial(put, Table.KEYS, b"k", b"1"))
        await until(lambda: b.get(Table.KEYS, b"k") == b"1")
        redis.kill()
        with pytest.raises(StoreUnreachable) as refused:
            await a.store.write(partial(put, Table.KEYS, b"k", b"2"))
        assert refused.value.status == 503 and refused.value.code == "STORE_UNAVAILABLE"
        await until(lambda: b.status.state is ReplicaState.DETACHED)
        with pytest.raises(StoreUnreachable):
            await b.store.write(partial(put, Table.KEYS, b"k", b"3"))
        # Reads and local writes go on from the replica.
        assert a.get(Table.KEYS, b"k") == b.get(Table.KEYS, b"k") == b"1"
        await a.store.write(partial(put, Table.USAGE, b"k", b"u"))
        redis.start()
        await until(lambda: a.status.state is b.status.state is ReplicaState.READY, 10)
        await b.store.write(partial(put, Table.KEYS, b"k", b"4"))
        await until(lambda: a.get(Table.KEYS, b"k") == b"4")


async def test_a_node_that_was_away_catches_up_or_rebuilds(redis: RedisServer) -> None:
    url = redis.url
    late = MemoryStore()
    async with node(url, "a", stream_length=1) as a:
        async with node(url, "late", local=late, follow=False):
            pass
        for i in range(300):  # far past the stream's trim point (MAXLEN ~ 1)
            await a.store.write(partial(put, Table.KEYS, b"k%03d" % i, b"v"))
        async with node(url, "late", local=late) as back:
            await until(lambda: back.status.applied_seq == 300)
            assert back.get(Table.KEYS, b"k299") == b"v"
            assert back.status.resyncs >= 1
        # A short absence: caught up from the stream.
        await a.store.write(partial(put, Table.KEYS, b"after", b"w"))
        async with node(url, "late", local=late) as back:
            await until(lambda: back.get(Table.KEYS, b"after") == b"w")


async def test_the_first_node_seeds_the_cluster_with_its_records(redis: RedisServer) -> None:
    url = redis.url
    single = MemoryStore()
    await single.write(partial(put, Table.KEYS, b"existing", b"x"))
    await single.write(partial(put, Table.META, b"datadir", b"own-marker"))
    async with node(url, "first", local=single), node(url, "second") as second:
        assert second.get(Table.KEYS, b"existing") == b"x"
        assert second.get(Table.META, b"datadir") is None  # each node's own
    # A store with records of its own may not join a cluster that has others.
    other = MemoryStore()
    await other.write(partial(put, Table.KEYS, b"mine", b"y"))
    with pytest.raises(StoreUnavailable, match="records of its own"):
        async with node(url, "intruder", local=other):
            pass


async def test_other_secrets_are_refused(redis: RedisServer) -> None:
    url = redis.url
    async with node(url, "a"):
        pass
    other = {"hmac": {1: "cc" * 16}, "encryption": {1: "bb" * 16}}
    store = MemoryStore()
    with pytest.raises(SecretsError, match="HMAC secret version 1 differs"):
        async with node(url, "b", fingerprints=other, local=store):
            pass
    with store.read() as txn:
        assert read_position(txn) is None  # nothing written


async def test_live_nodes_are_listed(redis: RedisServer) -> None:
    url = redis.url
    async with node(url, "a") as a, node(url, "b") as b:
        a.beat.admin_url = "http://127.0.0.1:1"
        await a.beat.beat()
        await b.beat.beat()
        listed = await list_nodes(a.log)
        assert [n.id for n in listed.items] == ["a", "b"]
        assert listed.items[0].admin_url == "http://127.0.0.1:1"
        assert listed.cluster_id == a.status.cluster_id
        await b.beat.leave()
        assert [n.id for n in (await list_nodes(a.log)).items] == ["a"]


async def test_propagation_delay(redis: RedisServer) -> None:
    """Write on one node, time until the other's replica has it. Printed
    (run with -s); the issue's bound (1 s) is the only assertion."""
    url = redis.url
    delays: list[float] = []
    async with node(url, "a") as a, node(url, "b") as b:
        for i in range(200):
            key = b"p%03d" % i
            await a.store.write(partial(put, Table.KEYS, key, b"v"))
            acked = time.perf_counter()
            with trio.fail_after(1.0):
                while b.get(Table.KEYS, key) is None:
                    await trio.lowlevel.checkpoint()
            delays.append(time.perf_counter() - acked)
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[int(len(delays) * 0.99) - 1]
    print(f"\npropagation after the write's ack: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
