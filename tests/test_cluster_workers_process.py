"""Cluster + workers: two real ``triogate serve`` nodes, each with
``server.workers = 2``, sharing one real Redis. A key limited to N a
minute, called round-robin over both nodes on fresh connections (the
kernel spreads them over each node's two workers), gets exactly N; a key
with C credits serves exactly C; a credit operation made on one node is
what the next request on the other node (either worker) meets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import (
    free_ports,
    serving,
    threaded_upstream,
    wait_for_workers,
)
from tests.redis_fixture import RedisServer, running_redis
from tests.test_cluster_process import SECRETS, _eventually
from tests.test_reload import config_doc, route, write_doc

JSON = dict[str, Any]


@pytest.fixture(name="redis")
def _redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def _config(tmp_path: Path, name: str, upstream: str, port: int) -> Path:
    doc = config_doc(
        tmp_path / name,
        {"a": upstream},
        [route("open", "/open", "a", plugins={"key-auth": {}})],
        server={"proxy_listen": f"127.0.0.1:{port}", "workers": 2},
    )
    return write_doc(tmp_path / f"{name}.toml", doc)


def _fresh(port: int, key: str) -> httpx.Response:
    """One request on a new connection (the kernel picks the worker)."""
    with httpx.Client(timeout=10) as client:
        return client.get(f"http://127.0.0.1:{port}/open", headers={"X-API-Key": key})


def _codes(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(
        "ok" if r.status_code == 200 else f"{r.status_code} {r.json()['code']}" for r in responses
    )


def _make_key(client: httpx.Client, admin: dict[str, str], **body: Any) -> JSON:
    r = client.post("/keys", json={"name": "k", "owner": "o", **body}, headers=admin)
    assert r.status_code == 201, r.text
    made: JSON = r.json()
    return made


def test_two_nodes_of_two_workers_count_exactly(tmp_path: Path, redis: RedisServer) -> None:
    ports = free_ports(2)
    with ExitStack() as stack:
        upstream = stack.enter_context(threaded_upstream())
        env = {"TRIOGATE_CLUSTER__REDIS_URL": redis.url, **SECRETS}
        nodes = []
        for name, port in zip("ab", ports, strict=True):
            node = stack.enter_context(serving(_config(tmp_path, name, upstream, port), env=env))
            wait_for_workers(node)
            nodes.append(node)
        clients = [stack.enter_context(sp.client()) for sp in nodes]
        r = clients[0].post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin = {"Authorization": f"Bearer {r.json()['key']}"}
        _eventually(lambda: clients[1].get("/keys", headers=admin).status_code == 200)

        limited = _make_key(
            clients[0], admin, rate_limits=[{"name": "m", "limit": 7, "period_seconds": 60}]
        )
        metered = _make_key(clients[1], admin, credits={"remaining": 9})
        # Known to every worker of every node: a plain key made last answers
        # 200 on fresh connections to both nodes (each worker follows the
        # stream into the node's replica).
        plain = _make_key(clients[0], admin)
        for port in ports:
            _eventually(
                lambda p=port: all(_fresh(p, plain["key"]).status_code == 200 for _ in range(6))
            )

        # Round-robin over the nodes, a fresh connection each time.
        answers = [_fresh(ports[i % 2], limited["key"]) for i in range(20)]
        assert _codes(answers) == {"ok": 7, "429 RATE_LIMITED": 13}
        answers = [_fresh(ports[i % 2], metered["key"]) for i in range(20)]
        assert _codes(answers) == {"ok": 9, "429 QUOTA_EXCEEDED": 11}
        assert [r.headers["x-credits-remaining"] for r in answers[:9]] == [
            str(n) for n in range(8, -1, -1)
        ]

        # A top-up on node a is what both workers of node b spend from next.
        r = clients[0].post(
            f"/keys/{metered['id']}/credits", json={"op": "increment", "amount": 4}, headers=admin
        )
        assert r.status_code == 200, r.text
        assert (r.json()["previous_remaining"], r.json()["credits_remaining"]) == (0, 4)
        answers = [_fresh(ports[1], metered["key"]) for _ in range(8)]
        assert _codes(answers) == {"ok": 4, "429 QUOTA_EXCEEDED": 4}
        for sp in nodes:
            assert sp.running, sp.stderr()
            assert "Traceback" not in sp.stderr(), sp.stderr()
