"""``redis+sentinel://`` URLs (core/cluster/redis.py): a real Redis primary
and a real Sentinel (``redis-server --sentinel``, the same Debian package)
on loopback; nodes given the Sentinel's URL find the primary through it and
share records and exact limits and credits there. Their decisions go by
coredis (the primary may move, so the thin path's fixed target is not
used)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.redis_fixture import RedisServer, _free_port, redis_server_binary, running_redis
from tests.test_cluster_records import node, put, until
from triogate.cluster.decide import limit_key
from triogate.cluster.limits import ClusterLimits, open_cluster_limits
from triogate.config import ClusterConfig
from triogate.policy.ratelimit import Limit
from triogate.storage import Table

SERVICE = "tgmain"
T0 = 1_800_000_000.0


class Holder:
    """A balance's owner as the data plane's actor is (``CreditHolder``)."""

    def __init__(self, key: str, credits: int) -> None:
        self.key = key
        self.credits: int | None = credits
        self.credits_version = 1
        self.credits_refilled_at: float | None = None

    def sync_credits(self, record: Any, now: float) -> None:
        pass


@contextlib.contextmanager
def running_sentinel(directory: Path, primary: RedisServer) -> Iterator[int]:
    """A Sentinel watching ``primary`` as ``SERVICE``; yields its port once it
    names the primary."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = directory / "sentinel.conf"  # Sentinel rewrites it: its own file
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {directory}\n"
        f"logfile {directory / 'sentinel.log'}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1\n"
    )
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf), "--sentinel"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sentinel = RedisServer(directory, port=port)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                log = (directory / "sentinel.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server --sentinel exited with {proc.returncode}:\n{log}")
            try:
                answer = sentinel.command("SENTINEL", "get-master-addr-by-name", SERVICE)
            except OSError:
                answer = b""
            if str(primary.port).encode() in answer:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Sentinel did not name the primary within 10 s: {answer!r}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _granted(cluster: ClusterLimits, items: list[tuple[str, Limit]], **kw: Any) -> bool:
    _, reservation, enough = await cluster.decide(items, T0, **kw)
    return reservation is not None and enough


async def test_nodes_on_a_sentinel_url_share_records_and_decisions(tmp_path: Path) -> None:
    with (
        running_redis(tmp_path / "primary") as primary,
        running_sentinel(tmp_path / "sentinel", primary) as port,
    ):
        url = f"redis+sentinel://127.0.0.1:{port}/{SERVICE}/0"
        # Records: a write made on one node reaches the other.
        async with node(url, "a") as a, node(url, "b") as b:
            await a.store.write(partial(put, Table.KEYS, b"k", b"1"))
            await until(lambda: b.get(Table.KEYS, b"k") == b"1")
        # Decisions: exact across two nodes, in the primary.
        config = ClusterConfig(redis_url=url, command_timeout_seconds=5.0)
        lim = Limit("minute", 3, 60.0)
        async with open_cluster_limits(config) as one, open_cluster_limits(config) as two:
            assert one.batcher.thin is None and two.batcher.thin is None  # coredis
            with trio.fail_after(20):
                await one.link.wait_reachable()
                await two.link.wait_reachable()
            results = [await _granted(n, [("key_s", lim)]) for n in (one, two) * 3]
            assert sorted(results) == [False] * 3 + [True] * 3
            left = [Holder("key_c", 2), Holder("key_c", 2)]
            spent = [
                await _granted(n, [], credits=h)
                for n, h in zip((one, two) * 2, left * 2, strict=True)
            ]
            assert spent == [True, True, False, False]
            assert one.fallbacks == 0 and two.fallbacks == 0
            key = limit_key(one.namespace, "key_s", lim)
        assert primary.command("EXISTS", key).startswith(b":1")
