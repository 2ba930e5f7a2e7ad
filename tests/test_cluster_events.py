"""Data-plane events once per cluster (core/cluster/events.py and
``LiveEvents.gate``), against a real redis-server: a claim is made by one
node only, an answer lost and the claim made again is still that node's,
two nodes (each its own outbox) write one ``rate_limit.exceeded``; Redis
away: the events wait, then are claimed once. Real nodes and a real
receiver: tests/test_cluster_events_process.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FakeClock
from tests.redis_fixture import RedisServer, redis_server, redis_url  # noqa: F401
from tests.test_events import _config, _deliveries
from triogate.cluster.events import ClaimsUnavailable, EventClaims
from triogate.cluster.redis import open_redis
from triogate.config import ClusterConfig
from triogate.events import LiveEvents, Outbox
from triogate.storage import Credits, MemoryStore


def _cluster(url: str) -> ClusterConfig:
    return ClusterConfig(redis_url=url, command_timeout_seconds=1.0)


async def test_a_claim_is_one_nodes(redis_url: str) -> None:  # noqa: F811
    async with open_redis(_cluster(redis_url)) as a, open_redis(_cluster(redis_url)) as b:
        a.ok()
        b.ok()
        one, two = EventClaims(a), EventClaims(b)
        assert await one.claim([("rate_limit.exceeded", "key_1", 60.0, "a:1")]) == [True]
        assert await two.claim(
            [
                ("rate_limit.exceeded", "key_1", 60.0, "b:1"),
                ("rate_limit.exceeded", "key_2", 60.0, "b:2"),
            ]
        ) == [False, True]
        # The same event claimed again (its answer was lost): still a's.
        assert await one.claim([("rate_limit.exceeded", "key_1", 60.0, "a:1")]) == [True]
        assert await one.claim([]) == []
        assert (one.claimed, two.claimed, two.lost) == (2, 1, 1)
        ttl = await a.client.pttl("{triogate}:em:rate_limit.exceeded:key_1")
        assert 0 < ttl <= 60_000


async def test_two_nodes_write_one_rate_limit_exceeded(
    tmp_path: Path,
    clock: FakeClock,
    redis_url: str,  # noqa: F811
) -> None:
    config = _config(tmp_path)
    async with open_redis(_cluster(redis_url)) as a, open_redis(_cluster(redis_url)) as b:
        a.ok()
        b.ok()
        stores = [MemoryStore(), MemoryStore()]  # two nodes: their own outboxes
        nodes = [
            LiveEvents(Outbox(config.events.webhooks), config.events, store, clock)
            for store in stores
        ]
        nodes[0].gate, nodes[1].gate = EventClaims(a), EventClaims(b)
        for node in nodes:
            node.rate_limited("key_A")
            node.spent("key_C", Credits(remaining=10), 2, 1)  # not claimed: Redis decided it
        assert await nodes[0].flush() == 2
        assert await nodes[1].flush() == 1
        kinds = [[d.event_type for d in _deliveries(s)] for s in stores]
        assert sorted(kinds[0]) == ["credits.low", "rate_limit.exceeded"]
        assert kinds[1] == ["credits.low"]


async def test_redis_away_the_events_wait_and_are_claimed_once(
    tmp_path: Path,
    clock: FakeClock,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    config = _config(tmp_path)
    async with (
        open_redis(_cluster(redis_server.url), health=False) as a,
        open_redis(_cluster(redis_server.url), health=False) as b,
    ):
        a.ok()
        b.ok()
        stores = [MemoryStore(), MemoryStore()]
        nodes = [
            LiveEvents(Outbox(config.events.webhooks), config.events, store, clock)
            for store in stores
        ]
        nodes[0].gate, nodes[1].gate = EventClaims(a), EventClaims(b)
        redis_server.kill()
        for node in nodes:
            node.rate_limited("key_A")
            node.spent("key_C", Credits(remaining=10), 0, 1)
        # Not claimable: the claim waits in the queue, the rest is written.
        assert await nodes[0].flush() == 1
        assert not a.reachable
        with pytest.raises(ClaimsUnavailable):
            await nodes[1].gate.claim([("rate_limit.exceeded", "key_A", 60.0, "t")])
        assert await nodes[1].flush() == 1
        assert await nodes[0].flush() == 0  # still waiting
        redis_server.start()
        a.ok()
        b.ok()  # what the health task does once a ping answers
        written = [await node.flush() for node in nodes]
        assert sorted(written) == [0, 1]
        assert (
            sum([d.event_type for d in _deliveries(s)].count("rate_limit.exceeded") for s in stores)
            == 1
        )
        assert [await node.flush() for node in nodes] == [0, 0]  # nothing left waiting
