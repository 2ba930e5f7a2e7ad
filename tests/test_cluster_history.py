"""Usage history, cluster-wide (core/cluster/usage_history.py): the sans-IO
layout, then real ``ClusterHistory`` objects (two "nodes") against a real
redis-server: sums across nodes, a resent batch counted once, retention,
and Redis going away (pending minutes kept, reads unavailable, then sent).
The process tests with real ``triogate serve`` nodes are in
tests/test_cluster_history_process.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.redis_fixture import RedisServer, redis_server, redis_url  # noqa: F401
from triogate.cluster.redis import open_redis
from triogate.cluster.usage_history import (
    ClusterHistory,
    history_call,
    parse_bucket,
    read_fields,
)
from triogate.config import ClusterConfig
from triogate.control.history import (
    HistoryQuery,
    HistoryService,
    HistoryUnavailable,
    Retention,
    UsageHistory,
)
from triogate.errors import NotFound, ValidationError
from triogate.storage import MemoryStore, Table

T0 = 1_780_000_000.0  # a fixed "now" (2026), on a minute boundary below
M0 = int(T0 // 60)  # its minute since the epoch
ONE = (1, 0, 0, 0, 0, 0, 1, 0, 0, 0)  # one allowed 2xx
LIMITED = (0, 1, 0, 0, 0, 0, 0, 0, 1, 0)  # one rate-limited 4xx


def _hour(minute: int) -> int:
    return minute - minute % 60


# ---- sans-IO ----------------------------------------------------------------------


def test_a_call_adds_each_minute_to_its_three_buckets_summed() -> None:
    retention = Retention(days=2, minute_hours=3)
    keys, args = history_call(
        "ns", "b1", [("key_a", {M0: list(ONE), M0 + 1: list(LIMITED)})], retention, T0
    )
    assert keys == ["{ns}:hb:b1", "{ns}:hist:key_a", "{ns}:hidx:key_a"]
    assert args[:5] == ["86400", str(M0), str(2 * 86400 + 86400), "256", "1"]
    buckets = int(args[5])
    rows = [args[6 + 12 * i : 6 + 12 * (i + 1)] for i in range(buckets)]
    by_field = {row[0]: (int(row[1]), [int(x) for x in row[2:]]) for row in rows}
    day = M0 - M0 % 1440
    both = [a + b for a, b in zip(ONE, LIMITED, strict=True)]
    assert by_field == {
        f"m{M0}": (M0 + 1 + 180, list(ONE)),
        f"m{M0 + 1}": (M0 + 2 + 180, list(LIMITED)),
        # Summed before they leave: one hour and one day bucket, if both
        # minutes are in the same hour (M0 is chosen so they are).
        f"h{_hour(M0)}": (_hour(M0) + 60 + 2880, both),
        f"d{day}": (day + 1440 + 2880, both),
    }


def test_minutes_are_kept_at_most_as_long_as_hours() -> None:
    retention = Retention(days=1, minute_hours=48)
    _, args = history_call("ns", "b", [("key_a", {M0: list(ONE)})], retention, T0)
    assert args[6:8] == [f"m{M0}", str(M0 + 1 + 1440)]


def test_parse_and_fields() -> None:
    assert parse_bucket(b"1,2,3,4,5,6,7,8,9,10") == list(range(1, 11))
    assert parse_bucket("1,2") == [1, 2, 0, 0, 0, 0, 0, 0, 0, 0]  # an older, shorter one
    assert parse_bucket(None) is None
    assert parse_bucket(b"garbage") is None
    assert read_fields("hour", 120, 300) == [(120, "h120"), (180, "h180"), (240, "h240")]
    assert read_fields("day", 0, 1) == [(0, "d0")]


class _Remote:
    """A ``RemoteHistory`` that answers fixed rows, or is unavailable."""

    def __init__(self, rows: list[tuple[int, list[int]]] | None) -> None:
        self.rows = rows
        self.asked: list[tuple[str, str, int, int]] = []

    async def read(
        self, owner: str, granularity: str, first: int, end: int
    ) -> list[tuple[int, list[int]]]:
        self.asked.append((owner, granularity, first, end))
        if self.rows is None:
            raise HistoryUnavailable("down")
        return self.rows


async def _service_with_key() -> tuple[HistoryService, str]:
    store = MemoryStore()
    key_id = "key_01JD3W7Q8M4K2N6P0R5S9T1V3X"
    await store.write(lambda txn: txn.put(Table.KEYS, key_id.encode(), b"x"))
    return HistoryService(store, clock=lambda: T0), key_id


async def test_the_service_answers_the_clusters_sums_or_its_own_marked_partial() -> None:
    service, key_id = await _service_with_key()
    query = HistoryQuery(granularity="minute")
    alone = await service.read_key_history(key_id, query)  # no cluster: the node's own
    assert alone.partial is False and alone.items == []

    service.cluster = _Remote([(M0 - 5, [3, 1, 0, 0, 0, 0, 3, 0, 1, 0])])
    got = await service.read_key_history(key_id, query)
    assert got.partial is False
    assert [(i.start, i.total, i.allowed, i.rate_limited) for i in got.items] == [
        (datetime.fromtimestamp((M0 - 5) * 60, UTC), 4, 3, 1)
    ]
    assert isinstance(got, UsageHistory)

    service.cluster = _Remote(None)  # Redis away: its own, said to be partial
    got = await service.read_key_history(key_id, query)
    assert got.partial is True and got.items == []


async def test_bad_queries_are_refused_before_the_cluster_is_asked() -> None:
    service, key_id = await _service_with_key()
    remote = _Remote([])
    service.cluster = remote
    too_long = HistoryQuery(
        granularity="minute",
        from_=datetime.fromtimestamp(T0 - 3 * 86400, UTC),
        to=datetime.fromtimestamp(T0, UTC),
    )
    with pytest.raises(ValidationError):
        await service.read_key_history(key_id, too_long)
    reversed_ = HistoryQuery(
        from_=datetime.fromtimestamp(T0, UTC), to=datetime.fromtimestamp(T0 - 60, UTC)
    )
    with pytest.raises(ValidationError):
        await service.read_key_history(key_id, reversed_)
    with pytest.raises(ValidationError):
        await service.read_key_history("not-an-id", HistoryQuery())
    with pytest.raises(NotFound):
        await service.read_key_history("key_01JD3W7Q8M4K2N6P0R5S9T1V3Y", HistoryQuery())
    with pytest.raises(NotFound):
        await service.read_identity_history("idn_01JD3W7Q8M4K2N6P0R5S9T1V3Y", HistoryQuery())
    assert remote.asked == []


# ---- against a real redis-server ------------------------------------------------------


def _config(url: str) -> ClusterConfig:
    return ClusterConfig(redis_url=url, command_timeout_seconds=1.0)


async def test_two_nodes_sum_and_a_resent_batch_counts_once(redis_url: str) -> None:  # noqa: F811
    retention = Retention()
    async with open_redis(_config(redis_url)) as link_a, open_redis(_config(redis_url)) as link_b:
        a = ClusterHistory(link_a, lambda: retention, clock=lambda: T0)
        b = ClusterHistory(link_b, lambda: retention, clock=lambda: T0)
        link_a.ok()
        link_b.ok()
        await a.push([(b"key_x", ((M0, ONE), (M0 + 1, ONE)))])
        await b.push([(b"key_x", ((M0, LIMITED),)), (b"idn_y", ((M0, ONE),))])
        assert a.waiting == b.waiting == 0 and a.sent == b.sent == 1

        minutes = await a.read("key_x", "minute", M0 - 10, M0 + 10)
        assert minutes == [(M0, [1, 1, 0, 0, 0, 0, 1, 0, 1, 0]), (M0 + 1, list(ONE))]
        hours = await b.read("key_x", "hour", _hour(M0), _hour(M0) + 60)
        assert hours == [(_hour(M0), [2, 1, 0, 0, 0, 0, 2, 0, 1, 0])]
        assert await b.read("idn_y", "minute", M0, M0 + 1) == [(M0, list(ONE))]
        assert await b.read("key_nobody", "day", 0, 1440 * 3) == []

        # A batch whose answer was lost is sent again with its id: added once.
        keys, args = history_call("triogate", "again", [("key_z", {M0: list(ONE)})], retention, T0)
        await a._run(keys, args)
        await a._run(keys, args)
        assert await a.read("key_z", "minute", M0, M0 + 1) == [(M0, list(ONE))]


async def test_buckets_past_their_retention_are_dropped(redis_url: str) -> None:  # noqa: F811
    retention = Retention(days=1, minute_hours=1)
    now = [T0]
    async with open_redis(_config(redis_url)) as link:
        link.ok()
        node = ClusterHistory(link, lambda: retention, clock=lambda: now[0])
        await node.push([(b"key_r", ((M0, ONE),))])
        assert await node.read("key_r", "minute", M0, M0 + 1) == [(M0, list(ONE))]
        now[0] = T0 + 2 * 3600  # two hours on: past the minutes' hour, not the hours' day
        assert await node.read("key_r", "minute", M0, M0 + 1) == []
        assert await node.read("key_r", "hour", _hour(M0), _hour(M0) + 60) != []
        # The next write drops it from Redis too.
        await node.push([(b"key_r", ((M0 + 120, ONE),))])
        hist = link.client
        fields = await hist.hkeys("{triogate}:hist:key_r")
        assert f"m{M0}".encode() not in fields and f"m{M0 + 120}".encode() in fields
        ttl = await hist.ttl("{triogate}:hist:key_r")
        assert 0 < ttl <= 2 * 86400
        # A minute already past its retention is not written at all.
        await node.push([(b"key_old", ((M0 - 600, ONE),))])
        old = set(await hist.hkeys("{triogate}:hist:key_old"))
        assert old == {f"h{_hour(M0 - 600)}".encode(), f"d{M0 - M0 % 1440}".encode()}


async def test_redis_away_keeps_the_minutes_and_sends_them_when_back(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    retention = Retention()
    async with open_redis(_config(redis_server.url), health=False) as link:
        link.ok()
        node = ClusterHistory(link, lambda: retention, clock=lambda: T0)
        await node.push([(b"key_o", ((M0, ONE),))])
        redis_server.kill()
        await node.push([(b"key_o", ((M0, ONE),))])  # fails: kept, and Redis is "down"
        assert node.waiting == 1 and not link.reachable and node.failures == 1
        await node.push([(b"key_o", ((M0 + 1, ONE),)), (b"key_p", ((M0, ONE),))])
        assert node.waiting == 3  # one unsent batch (key_o) and two pending owners
        with pytest.raises(HistoryUnavailable):
            await node.read("key_o", "minute", M0, M0 + 2)
        redis_server.start()
        link.ok()  # what the health task does once a ping answers
        assert await node.send() is True
        assert node.waiting == 0
        # Nothing lost, nothing twice (the server ran without persistence,
        # so only what was sent after the restart is there).
        assert await node.read("key_o", "minute", M0, M0 + 2) == [
            (M0, list(ONE)),
            (M0 + 1, list(ONE)),
        ]
        assert await node.read("key_p", "minute", M0, M0 + 1) == [(M0, list(ONE))]
