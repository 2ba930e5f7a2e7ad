"""The cluster's Redis link (core/cluster/redis.py) and what decisions do
when Redis goes away and comes back (core/cluster/limits.py), with a real
redis-server killed and restarted on the same port; the ``[cluster]``
settings; the Redis fixture itself."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.redis_fixture import (  # noqa: F401
    MISSING,
    RedisServer,
    redis_server,
    redis_server_binary,
    redis_url,
)
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.cluster.redis import open_redis, parse_sentinel_url, redacted
from triogate.config import ClusterConfig, parse_config
from triogate.errors import ConfigError, LimitsUnavailable
from triogate.policy.ratelimit import Limit

T0 = 1_800_000_000.0
FAST = {"health_interval_seconds": 0.05, "connect_timeout_seconds": 0.5}


class Holder:
    def __init__(self, key: str, credits: int) -> None:
        self.key = key
        self.credits: int | None = credits
        self.credits_version = 1
        self.credits_refilled_at: float | None = None

    def sync_credits(self, record: object, now: float) -> None:
        pass


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll (bounded: 10 s) until ``predicate``: the link's state changes
    from its own health task, which signals nothing a test could wait on."""
    with trio.fail_after(10.0):
        for _ in range(1000):
            if predicate():
                return
            await trio.sleep(0.02)
    raise AssertionError(f"never {what}")


# ---- the fixture ---------------------------------------------------------------------


def test_a_missing_redis_server_fails_and_names_install_sh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(os.path, "exists", lambda _: False)
    with pytest.raises(pytest.fail.Exception) as failed:
        redis_server_binary()
    assert str(failed.value) == MISSING
    assert "tests/system/install.sh" in MISSING


def test_the_fixture_kills_and_restarts_on_the_same_port(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    port = redis_server.port
    assert redis_server.ping()
    redis_server.kill()
    assert not redis_server.ping() and not redis_server.running
    redis_server.restart()
    assert redis_server.port == port and redis_server.ping()


# ---- settings ------------------------------------------------------------------------


def test_cluster_settings_and_their_environment_override() -> None:
    config = parse_config({}, environ={"TRIOGATE_CLUSTER__REDIS_URL": "redis://10.0.0.9:6379/2"})
    assert config.cluster.redis_url == "redis://10.0.0.9:6379/2"
    assert config.cluster.fallback == "local"
    assert parse_config({}, environ={}).cluster.redis_url is None
    with pytest.raises(ConfigError) as bad:
        parse_config({"cluster": {"redis_url": "http://x", "fallback": "maybe"}}, environ={})
    paths = {e.path for e in bad.value.errors}
    assert {"cluster.redis_url", "cluster.fallback"} <= paths


def test_sentinel_urls_and_redaction() -> None:
    spec = parse_sentinel_url("redis+sentinel://u:p%40ss@s1:26379,s2:26380/main/3")
    assert spec.sentinels == (("s1", 26379), ("s2", 26380))
    assert (spec.service, spec.db, spec.username, spec.password) == ("main", 3, "u", "p@ss")
    with pytest.raises(ValueError, match="service"):
        parse_sentinel_url("redis+sentinel://s1:26379")
    assert redacted("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"


# ---- health and reconnecting ------------------------------------------------------------


async def test_the_link_reports_health_and_reconnects_by_itself(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    config = ClusterConfig(redis_url=redis_server.url, **FAST)
    async with open_redis(config) as link:
        health = link.health()
        assert health.reachable and health.rtt_seconds is not None
        redis_server.kill()
        await wait_for(lambda: not link.reachable, "down")
        assert link.health().errors >= 1 and link.health().last_error
        redis_server.restart()
        await wait_for(lambda: link.reachable, "up")
        assert await link.client.ping() == b"PONG"


async def test_a_link_opens_while_redis_is_down(tmp_path: Path) -> None:
    down = RedisServer(tmp_path / "r")
    config = ClusterConfig(redis_url=down.url, **FAST)
    async with open_redis(config) as link:
        assert not link.reachable
        down.start()
        try:
            await wait_for(lambda: link.reachable, "up")
        finally:
            down.stop()


# ---- decisions through an outage -------------------------------------------------------


async def test_local_fallback_decides_alone_then_charges_the_debt(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    config = ClusterConfig(redis_url=redis_server.url, fallback="local", **FAST)
    lim = Limit("minute", 3, 60.0)
    async with open_cluster_limits(config) as cluster:
        holder = Holder("key_d", 10)
        assert (await cluster.decide([("key_d", lim)], T0, credits=holder))[1] is not None
        assert holder.credits == 9
        redis_server.kill()
        # Nothing crashes: this node decides alone (its own limiter states).
        granted = [
            (await cluster.decide([("key_d", lim)], T0, credits=holder))[1] is not None
            for _ in range(5)
        ]
        assert granted == [True, True, True, False, False]
        assert holder.credits == 6 and cluster.fallbacks >= 5
        redis_server.restart()  # empty: no persistence in this test
        await wait_for(lambda: cluster.link.reachable, "up")
        # The balance Redis lost comes back from this node (which already
        # counted its own spending), so no debt is charged twice.
        assert (await cluster.decide([("key_d", lim)], T0, credits=holder))[1] is not None
        assert holder.credits == 5


async def test_the_debt_is_charged_to_a_balance_redis_kept(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    config = ClusterConfig(redis_url=redis_server.url, fallback="local", **FAST)
    async with open_cluster_limits(config) as node, open_cluster_limits(config) as other:
        mine, theirs = Holder("key_k", 10), Holder("key_k", 10)
        await node.decide([], T0, credits=mine)
        assert mine.credits == 9
        redis_server.command("CLIENT", "PAUSE", "600", "ALL")  # frozen: decisions time out
        node.link.failed(ConnectionError("test: cut off"))
        await node.decide([], T0, credits=mine)
        await node.decide([], T0, credits=mine)
        assert mine.credits == 7  # spent alone, remembered as a debt of 2
        await trio.sleep(0.7)
        await wait_for(lambda: node.link.reachable and other.link.reachable, "up")
        await other.decide([], T0, credits=theirs)  # the cluster's balance: 9 - 1
        assert theirs.credits == 8
        await node.decide([], T0, credits=mine)  # the debt is charged now
        assert mine.credits == 8 - 2 - 1
        await other.decide([], T0, credits=theirs)
        assert theirs.credits == 4


async def test_deny_fallback_answers_503_and_recovers(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    config = ClusterConfig(redis_url=redis_server.url, fallback="deny", **FAST)
    lim = Limit("minute", 100, 60.0)
    async with open_cluster_limits(config) as cluster:
        assert (await cluster.decide([("key_x", lim)], T0))[1] is not None
        redis_server.kill()
        with pytest.raises(LimitsUnavailable) as refused:
            await cluster.decide([("key_x", lim)], T0)
        assert refused.value.status == 503 and refused.value.code == "LIMITS_UNAVAILABLE"
        assert refused.value.headers["Retry-After"] == "1"
        redis_server.restart()
        await wait_for(lambda: cluster.link.reachable, "up")
        assert (await cluster.decide([("key_x", lim)], T0))[1] is not None


async def test_a_late_answer_after_a_timeout_is_undone(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    config = ClusterConfig(
        redis_url=redis_server.url, command_timeout_seconds=0.05, health_interval_seconds=60
    )
    lim = Limit("minute", 2, 60.0)
    async with open_cluster_limits(config) as cluster:
        holder = Holder("key_l", 5)
        assert (await cluster.decide([("key_l", lim)], T0, credits=holder))[1] is not None
        redis_server.command("CLIENT", "PAUSE", "400", "ALL")
        await cluster.decide([("key_l", lim)], T0, credits=holder)  # timed out: decided here
        assert cluster.fallbacks == 1
        await wait_for(lambda: cluster.late_undos == 1, "late undo")
        cluster.link.ok()
        probe = Holder("key_l", 0)
        await cluster.decide([], T0, credits=probe)
        # Redis: 5 - 1 (the first decision); the late one given back; then
        # the probe's decision charges what this node spent alone (1) and its own 1.
        assert probe.credits == 2


def test_local_routes_and_keyspaces() -> None:
    config = ClusterConfig(local_routes=["search"], local_keyspaces=["test"])
    limits = ClusterLimits(None, None, config)  # type: ignore[arg-type]  # not deciding
    assert limits.is_local(route="search") and limits.is_local(keyspace="test")
    assert not limits.is_local(route="users", keyspace="default")
