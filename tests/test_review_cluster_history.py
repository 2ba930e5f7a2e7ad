"""Review of the cluster-wide usage history (core/cluster/usage_history.py,
docs/cluster.md "Usage history across nodes") against a real redis-server:
memory while Redis is away, a script refused by Redis, the script's
all-or-nothing writes, and the retention edges."""

from __future__ import annotations

import pytest

from tests.redis_fixture import RedisServer, redis_server, redis_url  # noqa: F401
from triogate.cluster import usage_history
from triogate.cluster.redis import open_redis
from triogate.cluster.usage_history import ClusterHistory, history_call
from triogate.config import ClusterConfig
from triogate.control.history import Retention

T0 = 1_780_000_000.0
M0 = int(T0 // 60)
ONE = (1, 0, 0, 0, 0, 0, 1, 0, 0, 0)


def _config(url: str) -> ClusterConfig:
    return ClusterConfig(redis_url=url, command_timeout_seconds=1.0)


def _held(node: ClusterHistory) -> int:
    """The owner-minutes the node holds in memory, counted from its maps."""
    pending = sum(len(m) for m in node._pending.values())
    return pending + sum(len(m) for b in node._unsent for _, m in b.owners)


async def test_memory_is_bounded_in_minutes_while_redis_is_away(
    redis_server: RedisServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One busy key during a long outage adds a minute per minute: owners
    alone (MAX_OWNERS) do not bound the memory, owner-minutes must."""
    monkeypatch.setattr(usage_history, "MAX_MINUTES", 50, raising=False)
    retention = Retention()
    async with open_redis(_config(redis_server.url), health=False) as link:
        link.ok()
        node = ClusterHistory(link, lambda: retention, clock=lambda: T0)
        redis_server.kill()
        for flush in range(200):  # 200 minutes of an outage, two keys
            minute = M0 - 1000 + flush
            await node.push([(b"key_a", ((minute, ONE),)), (b"key_b", ((minute, ONE),))])
        assert not link.reachable
        assert _held(node) <= 50
        assert node.dropped == 400 - _held(node)  # what was left out is counted
        # The same minute again merges: it costs no memory and is not dropped.
        held, dropped = _held(node), node.dropped
        await node.push([(b"key_a", ((M0 - 999, ONE),))])  # pending, not in the unsent batch
        assert (_held(node), node.dropped) == (held, dropped)

        redis_server.start()
        link.ok()
        assert await node.send() is True
        assert node.waiting == 0 and _held(node) == 0
        # Room again once sent.
        await node.push([(b"key_c", ((M0, ONE),))])
        assert node.sent >= 1 and node.dropped == dropped
        assert await node.read("key_c", "minute", M0, M0 + 1) == [(M0, list(ONE))]


async def test_a_batch_redis_refuses_neither_blocks_the_rest_nor_downs_the_link(
    redis_url: str,  # noqa: F811
) -> None:
    """A key of the wrong type in the namespace (a stray write, an old
    version): Redis answers, so the node is still in the cluster (the
    limits must not fall back), the other keys' minutes still arrive, and
    the run is all or nothing: no half-written batch."""
    retention = Retention()
    async with open_redis(_config(redis_url), health=False) as link:
        link.ok()
        client = link.client
        await client.set("{triogate}:hist:key_bad", "not a hash")
        node = ClusterHistory(link, lambda: retention, clock=lambda: T0)
        await node.push([(b"key_good", ((M0, ONE),)), (b"key_bad", ((M0, ONE),))])
        assert link.reachable
        assert await node.read("key_good", "minute", M0, M0 + 1) == [(M0, list(ONE))]
        assert await client.get("{triogate}:hist:key_bad") == b"not a hash"
        # Nothing waits for ever behind it: later flushes go through.
        await node.push([(b"key_next", ((M0, ONE),))])
        assert node.waiting == 0
        assert await node.read("key_next", "minute", M0, M0 + 1) == [(M0, list(ONE))]
        assert link.reachable


async def test_a_run_with_a_bad_owner_writes_the_others_exactly_once(
    redis_url: str,  # noqa: F811
) -> None:
    """The script checks before it writes: sent twice (its answer lost),
    the good owner's minute is counted once, the bad one is left alone."""
    retention = Retention()
    async with open_redis(_config(redis_url), health=False) as link:
        link.ok()
        client = link.client
        await client.set("{triogate}:hidx:key_bad2", "not a zset")
        node = ClusterHistory(link, lambda: retention, clock=lambda: T0)
        owners = [("key_ok2", {M0: list(ONE)}), ("key_bad2", {M0: list(ONE)})]
        keys, args = history_call("triogate", "twice", owners, retention, T0)
        for _ in range(2):
            await node._run(keys, args)
        assert await node.read("key_ok2", "minute", M0, M0 + 1) == [(M0, list(ONE))]
        assert await client.exists(["{triogate}:hist:key_bad2"]) == 0


async def test_a_minute_at_the_retention_edge_is_kept_or_dropped_on_both_sides(
    redis_url: str,  # noqa: F811
) -> None:
    """The last minute still kept is written and read; the first one past
    it is neither (the same edge as the single node's pruner)."""
    retention = Retention(days=1, minute_hours=1)
    async with open_redis(_config(redis_url), health=False) as link:
        link.ok()
        node = ClusterHistory(link, lambda: retention, clock=lambda: T0)
        kept, gone = M0 - 60, M0 - 61  # start + 1 + 60 > now, and not
        await node.push([(b"key_edge", ((kept, ONE), (gone, ONE)))])
        rows = await node.read("key_edge", "minute", M0 - 70, M0)
        assert rows == [(kept, list(ONE))]
        cutoff = retention.cutoffs(T0)[b"m"]  # the single node keeps start >= cutoff
        assert kept >= cutoff > gone


async def test_redis_out_of_memory_keeps_the_link_up_and_the_batch_bounded(
    redis_url: str,  # noqa: F811
) -> None:
    """``maxmemory`` reached under ``noeviction`` (the setting the docs
    recommend): Redis answers OOM. The node stays in the cluster, the batch
    is retried, and after ``BATCH_TRIES`` it is dropped and counted, so it
    cannot hold back every later flush."""
    retention = Retention()
    async with open_redis(_config(redis_url), health=False) as link:
        link.ok()
        client = link.client
        node = ClusterHistory(link, lambda: retention, clock=lambda: T0)
        await client.config_set({"maxmemory-policy": "noeviction", "maxmemory": "1"})
        try:
            await node.push([(b"key_oom", ((M0, ONE),))])
            assert link.reachable and node.waiting == 1 and node.refused == 1
            for _ in range(usage_history.BATCH_TRIES):  # bounded: dropped within it
                if node.waiting == 0:
                    break
                await node.send()
            assert node.waiting == 0 and node.dropped == 1
            assert link.reachable
        finally:
            await client.config_set({"maxmemory": "0"})
        await node.push([(b"key_after", ((M0, ONE),))])
        assert await node.read("key_after", "minute", M0, M0 + 1) == [(M0, list(ONE))]


# ---- events claimed once per cluster (core/cluster/events.py) -----------------------


async def test_a_claim_redis_refuses_is_no_claim(redis_url: str) -> None:  # noqa: F811
    """Out of memory, Redis refuses the ``SET NX``: the answer is an error,
    not a claim. Counting it as one would let every node write the event."""
    from triogate.cluster.events import ClaimsUnavailable, EventClaims

    async with (
        open_redis(_config(redis_url), health=False) as a,
        open_redis(_config(redis_url), health=False) as b,
    ):
        a.ok()
        b.ok()
        await a.client.config_set({"maxmemory-policy": "noeviction", "maxmemory": "1"})
        try:
            verdicts = []
            for link, token in ((a, "a:1"), (b, "b:1")):
                try:
                    verdicts += await EventClaims(link).claim(
                        [("rate_limit.exceeded", "key_oom", 60.0, token)]
                    )
                except ClaimsUnavailable:
                    verdicts.append(None)
        finally:
            await a.client.config_set({"maxmemory": "0"})
        assert True not in verdicts, verdicts
