"""The batcher's thin decision path (core/cluster/resp.py): EVALSHA
pipelines over its own socket with hiredis.Reader, against a real
redis-server: exact counts shared with coredis nodes, NOSCRIPT, a lost
connection and a frozen Redis (the fallback answers, then it reconnects),
AUTH and SELECT from the URL, a unix socket and TLS (``rediss://``).
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio
import trio.testing
import trustme
from coredis.exceptions import (
    AuthenticationFailureError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from coredis.exceptions import ConnectionError as RedisConnectionError

from tests.redis_fixture import (  # noqa: F401
    RedisServer,
    _free_port,
    redis_server,
    redis_url,
    running_redis,
)
from triogate.cluster.credits import credit_call, parse_credit
from triogate.cluster.decide import limit_key
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.cluster.lua import CREDIT
from triogate.cluster.resp import RespPath, RespTarget, reply_error, target_of
from triogate.config import ClusterConfig
from triogate.errors import LimitsUnavailable
from triogate.policy.ratelimit import Limit

T0 = 1_800_000_000.0
_names = itertools.count()


class Holder:
    """A balance's owner as the data plane's actor is (``CreditHolder``)."""

    def __init__(self, key: str, credits: int | None) -> None:
        self.key = key
        self.credits = credits
        self.credits_version = 1
        self.credits_refilled_at: float | None = None

    def sync_credits(self, record: Any, now: float) -> None:
        pass


def _config(url: str, **kw: Any) -> ClusterConfig:
    base: dict[str, Any] = {"command_timeout_seconds": 5.0, "health_interval_seconds": 0.05}
    base.update(kw)
    return ClusterConfig(redis_url=url, **base)


async def _granted(cluster: ClusterLimits, items: Sequence[tuple[str, Limit]], **kw: Any) -> bool:
    _, reservation, enough = await cluster.decide(items, T0, **kw)
    return reservation is not None and enough


def _thin(cluster: ClusterLimits) -> RespPath:
    thin = cluster.batcher.thin
    assert thin is not None, "the thin path is wired in for a redis:// URL"
    return thin


async def _reachable(cluster: ClusterLimits) -> None:
    with trio.fail_after(20):
        await cluster.link.wait_reachable()


# ---- sans-IO: targets, errors -----------------------------------------------------


def test_the_target_is_read_from_the_url_as_coredis_reads_it() -> None:
    tcp = target_of(coredis.Redis.from_url("redis://ann:p%40ss@10.1.2.3:7000/5"))
    assert tcp is not None
    assert (tcp.host, tcp.port, tcp.path, tcp.db) == ("10.1.2.3", 7000, None, 5)
    assert (tcp.username, tcp.ssl_context) == ("ann", None)
    assert "p%40ss" not in repr(tcp) and "ann" not in repr(tcp)
    bare = target_of(coredis.Redis.from_url("redis://:secret@localhost"))
    assert bare is not None and (bare.username, bare.password, bare.db) == (None, "secret", 0)
    unix = target_of(coredis.Redis.from_url("unix:///run/redis/redis.sock?db=2"))
    assert unix is not None and (unix.path, unix.host, unix.db) == (
        "/run/redis/redis.sock",
        None,
        2,
    )
    tls = target_of(coredis.Redis.from_url("rediss://h:6380/1"))
    assert tls is not None and tls.ssl_context is not None and tls.db == 1
    assert target_of(object()) is None


def test_error_replies_become_the_coredis_exceptions() -> None:
    noscript = reply_error("NOSCRIPT No matching script. Please use EVAL.")
    assert isinstance(noscript, NoScriptError)
    other = reply_error("ERR user_script:1: boom")
    assert isinstance(other, ResponseError) and not isinstance(other, NoScriptError)


async def test_a_failed_connect_backs_off_until_reset(mock_clock: trio.testing.MockClock) -> None:
    path = RespPath(RespTarget(host="127.0.0.1", port=_free_port()), connect_timeout=1.0)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await path.command("PING")
    # Within the back-off no connect is tried.
    with pytest.raises(RedisConnectionError, match="reconnecting to Redis in"):
        await path.command("PING")
    mock_clock.jump(5.0)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await path.command("PING")
    path.reset_backoff()  # the link saw Redis answer: try at once
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await path.command("PING")
    assert path.connects == 0


# ---- against a real redis-server ------------------------------------------------------


async def test_thin_and_coredis_nodes_share_exact_limits_and_credits(
    redis_url: str,  # noqa: F811
) -> None:
    lim = Limit("minute", 5, 60.0)
    async with (
        open_cluster_limits(_config(redis_url)) as thin,
        open_cluster_limits(_config(redis_url), thin=False) as plain,
    ):
        assert plain.batcher.thin is None
        results: list[bool] = []

        async def one(node: ClusterLimits) -> None:
            results.append(await _granted(node, [("key_a", lim)]))

        async with trio.open_nursery() as nursery:
            for i in range(9):
                nursery.start_soon(one, thin if i % 3 else plain)
        assert sorted(results) == [False] * 4 + [True] * 5
        # Credits: 3, spent from both nodes; never below zero.
        one_view, other_view = Holder("key_c", 3), Holder("key_c", 3)
        spent = [await _granted(thin, [], credits=one_view) for _ in range(2)]
        spent += [await _granted(plain, [], credits=other_view) for _ in range(2)]
        assert spent == [True, True, True, False]
        assert one_view.credits == 1 and other_view.credits == 0
        assert _thin(thin).connects == 1 and _thin(thin).losses == 0


async def test_a_credit_operation_in_the_same_tick_goes_by_coredis(
    redis_url: str,  # noqa: F811
) -> None:
    async with open_cluster_limits(_config(redis_url)) as node:
        holder = Holder("key_m", 10)
        wire = node.balance_of(holder, None)
        keys, args = credit_call(node.namespace, wire, "increment", 5, 10**15)
        replies: list[Any] = []

        async def credit() -> None:
            replies.append(parse_credit(await node.batcher.call(CREDIT, keys, args)))

        async def decide() -> None:
            replies.append(await _granted(node, [("key_m", Limit("m", 9, 60.0))]))

        before = node.batcher.stats.pipelines
        async with trio.open_nursery() as nursery:
            nursery.start_soon(credit)
            nursery.start_soon(decide)
            nursery.start_soon(decide)
        assert node.batcher.stats.pipelines - before == 1  # one tick, one batch
        credit_reply = next(r for r in replies if not isinstance(r, bool))
        assert (credit_reply.old, credit_reply.new) == (10, 15)
        assert [r for r in replies if isinstance(r, bool)] == [True, True]


async def test_noscript_loads_the_scripts_and_sends_again(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    lim = Limit("minute", 2, 60.0)
    async with open_cluster_limits(_config(redis_server.url)) as node:
        assert await _granted(node, [("key_s", lim)])
        reloads = node.batcher.stats.reloads
        assert redis_server.command("SCRIPT", "FLUSH").startswith(b"+OK")
        assert await _granted(node, [("key_s", lim)])
        assert not await _granted(node, [("key_s", lim)])
        assert node.batcher.stats.reloads == reloads + 1
        assert node.fallbacks == 0 and _thin(node).connects == 1


async def test_a_connection_closed_while_idle_is_reopened_before_sending(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    lim = Limit("minute", 100, 60.0)
    async with open_cluster_limits(_config(redis_server.url, fallback="local")) as node:
        assert await _granted(node, [("key_i", lim)])
        path = _thin(node)
        client_id = await path.command("CLIENT", "ID")  # the batcher is idle
        killed = redis_server.command("CLIENT", "KILL", "ID", str(client_id))
        assert killed.startswith(b":1"), killed
        # Found closed before the pipeline went out: Redis answers, no fallback.
        assert await _granted(node, [("key_i", lim)])
        assert node.fallbacks == 0 and (path.losses, path.connects) == (1, 2)


async def test_a_connection_lost_in_flight_fails_the_pending_decisions_then_reconnects(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    lim = Limit("minute", 100, 60.0)
    async with open_cluster_limits(_config(redis_server.url, fallback="local")) as node:
        assert await _granted(node, [("key_l", lim)])
        path = _thin(node)
        answers: list[bool] = []

        async def one() -> None:
            answers.append(await _granted(node, [("key_l", lim)]))

        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # the pipeline stays unanswered
        pipelines = node.batcher.stats.pipelines
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
            with trio.fail_after(20):
                while node.batcher.stats.pipelines == pipelines:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            redis_server.kill()  # the connection breaks with the pipeline in flight
        # Every pending decision failed over to the local fallback, none raised.
        assert answers == [True] * 5
        assert node.fallbacks == 5 and path.losses == 1
        redis_server.start()
        await _reachable(node)
        assert await _granted(node, [("key_l", lim)])
        assert node.fallbacks == 5 and path.connects == 2


async def test_a_frozen_redis_answers_by_the_fallback_and_drops_the_connection(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    lim = Limit("minute", 100, 60.0)
    config = _config(redis_server.url, command_timeout_seconds=0.5, fallback="deny")
    async with open_cluster_limits(config) as node:
        assert await _granted(node, [("key_f", lim)])
        path, stats = _thin(node), node.batcher.stats
        sent, pipelines = stats.calls, stats.pipelines
        refused: list[str] = []

        async def one() -> None:
            with pytest.raises(LimitsUnavailable) as caught:
                await node.decide([("key_f", lim)], T0)
            refused.append(caught.value.code)

        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)  # sent: its pipeline waits for an answer
                with trio.fail_after(20):
                    while stats.pipelines == pipelines:  # noqa: ASYNC110 (the batcher's)
                        await trio.sleep(0.01)
                nursery.start_soon(one)  # queued behind it
                await trio.testing.wait_all_tasks_blocked()
                assert node.batcher.queued == 1
            # Both answered by the fallback after command_timeout_seconds.
            assert refused == ["LIMITS_UNAVAILABLE"] * 2
            assert node.fallbacks == 2 and not node.link.reachable
            # The pipeline's own timeout (4 x command_timeout, at least 1 s)
            # then gives the connection up: its replies would come late.
            with trio.fail_after(20):
                while path.losses == 0:  # noqa: ASYNC110 (the batcher task's state)
                    await trio.sleep(0.05)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        # The queued run, given up on before it went out, was never sent.
        assert stats.calls == sent + 1 and node.batcher.queued == 0
        await _reachable(node)
        assert await _granted(node, [("key_f", lim)])
        assert path.connects == 2 and node.fallbacks == 2


async def test_auth_and_database_come_from_the_url(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    assert redis_server.command("CONFIG", "SET", "requirepass", "s3cret").startswith(b"+OK")
    port = redis_server.port
    url = f"redis://default:s3cret@127.0.0.1:{port}/3"
    lim = Limit("minute", 1, 60.0)
    async with open_cluster_limits(_config(url)) as node:
        node.namespace = f"auth{next(_names)}"
        assert await _granted(node, [("key_d", lim)])
        assert not await _granted(node, [("key_d", lim)])
        assert node.fallbacks == 0 and _thin(node).target.db == 3
        key = limit_key(node.namespace, "key_d", lim)
    for db, expected in ((3, 1), (0, 0)):
        path = RespPath(
            RespTarget(host="127.0.0.1", port=port, password="s3cret", db=db), connect_timeout=5
        )
        assert await path.command("EXISTS", key) == expected
        await path.close()
    wrong = RespPath(RespTarget(host="127.0.0.1", port=port, password="wrong"), connect_timeout=5)
    with pytest.raises(AuthenticationFailureError):
        await wrong.command("PING")
    assert isinstance(AuthenticationFailureError("x"), RedisError)


async def test_decisions_over_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    args = ["--unixsocket", str(sock), "--unixsocketperm", "700"]
    with running_redis(tmp_path / "redis", extra_args=args):
        lim = Limit("minute", 2, 60.0)
        async with open_cluster_limits(_config(f"unix://{sock}?db=2")) as node:
            results = [await _granted(node, [("key_u", lim)]) for _ in range(3)]
            assert results == [True, True, False]
            path = _thin(node)
            assert path.target.path == str(sock) and path.target.db == 2
            assert path.connects == 1 and node.fallbacks == 0


async def test_decisions_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    tls_port = _free_port()
    args = [
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(files["cert"]),
        "--tls-key-file",
        str(files["key"]),
        "--tls-ca-cert-file",
        str(files["ca"]),
        "--tls-auth-clients",
        "no",
    ]
    with running_redis(tmp_path / "redis", extra_args=args):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={files['ca']}"
        lim = Limit("minute", 2, 60.0)
        async with open_cluster_limits(_config(url)) as node:
            await _reachable(node)
            results = [await _granted(node, [("key_t", lim)]) for _ in range(3)]
            assert results == [True, True, False]
            path = _thin(node)
            assert path.target.ssl_context is not None
            assert path.connects == 1 and node.fallbacks == 0
