"""Limits and credits across real ``triogate serve`` nodes sharing one real
Redis: a key limited to 9 a minute, called round-robin over three nodes,
gets exactly 9; 11 credits give exactly 11; Redis killed: known keys go on
(fallback ``local``), a node with fallback ``deny`` answers 503
``LIMITS_UNAVAILABLE``; Redis back: the limits are the cluster's again."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, serving, threaded_upstream
from tests.redis_fixture import RedisServer, running_redis
from tests.test_cluster_process import SECRETS, _config, _eventually, _problem, _proxy

JSON = dict[str, Any]


@pytest.fixture(name="redis")
def _redis(tmp_path: Path) -> Iterator[RedisServer]:
    # Persistent: the outage test restarts it and expects what it acknowledged.
    with running_redis(tmp_path / "redis", persistence=True) as server:
        yield server


def _codes(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(
        "ok" if r.status_code == 200 else f"{r.status_code} {r.json()['code']}" for r in responses
    )


def _round_robin(nodes: list[ServeProcess], key: str, count: int) -> list[httpx.Response]:
    return [_proxy(nodes[i % len(nodes)], key) for i in range(count)]


def _make_key(client: httpx.Client, admin: dict[str, str], **body: Any) -> JSON:
    r = client.post("/keys", json={"name": "k", "owner": "o", **body}, headers=admin)
    assert r.status_code == 201, r.text
    made: JSON = r.json()
    return made


def _known_everywhere(clients: list[httpx.Client], admin: dict[str, str], key_id: str) -> None:
    # Asked of the admin API: a proxied request would spend from the key.
    for client in clients:
        _eventually(lambda c=client: c.get(f"/keys/{key_id}", headers=admin).status_code == 200)


def test_limits_and_credits_are_the_clusters(tmp_path: Path, redis: RedisServer) -> None:
    with ExitStack() as stack:
        upstream = stack.enter_context(threaded_upstream())
        env = {"TRIOGATE_CLUSTER__REDIS_URL": redis.url, **SECRETS}
        nodes = [
            stack.enter_context(serving(_config(tmp_path, n, upstream), env=env))
            for n in ("a", "b", "c")
        ]
        deny = stack.enter_context(
            serving(
                _config(tmp_path, "d", upstream),
                env={**env, "TRIOGATE_CLUSTER__FALLBACK": "deny"},
            )
        )
        clients = [stack.enter_context(sp.client()) for sp in (*nodes, deny)]
        r = clients[0].post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin = {"Authorization": f"Bearer {r.json()['key']}"}
        for client in clients[1:]:
            _eventually(lambda c=client: c.get("/keys", headers=admin).status_code == 200)

        limited = _make_key(
            clients[1], admin, rate_limits=[{"name": "m", "limit": 9, "period_seconds": 60}]
        )
        metered = _make_key(clients[2], admin, credits={"remaining": 11})
        plain = _make_key(clients[0], admin)
        for made in (limited, metered, plain):
            _known_everywhere(clients, admin, made["id"])

        # Exactly the key's limit and its credits, whichever node answers.
        assert _codes(_round_robin(nodes, limited["key"], 30)) == {
            "ok": 9,
            "429 RATE_LIMITED": 21,
        }
        answers = _round_robin(nodes, metered["key"], 30)
        assert _codes(answers) == {"ok": 11, "429 QUOTA_EXCEEDED": 19}
        assert [r.headers["x-credits-remaining"] for r in answers[:11]] == [
            str(n) for n in range(10, -1, -1)
        ]
        assert _proxy(deny, limited["key"]).status_code == 429  # the fourth node agrees

        # A credit operation is the cluster's: a top-up on one node, spent
        # by validate on another (tests/test_cluster_credits_process.py).
        r = clients[0].post(
            f"/keys/{metered['id']}/credits", json={"op": "increment", "amount": 1}, headers=admin
        )
        assert r.status_code == 200 and r.json()["credits_remaining"] == 1, r.text
        r = clients[1].post(
            "/keys/validate", json={"key": metered["key"], "spend": 1}, headers=admin
        )
        assert r.status_code == 200 and r.json()["valid"] is True, r.text
        # validate's peek: the cluster's balance.
        r = clients[2].post("/keys/validate", json={"key": metered["key"]}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["valid"] is True and r.json()["credits_remaining"] == 0, r.text

        # Redis killed: known keys still served; limits fall back.
        redis.kill()
        for sp in nodes:
            assert _proxy(sp, plain["key"]).status_code == 200
        fresh = [_proxy(sp, limited["key"]) for sp in nodes]
        # fallback "local": each node decides on its own (the full limit each).
        assert all(r.status_code == 200 for r in fresh), [r.text for r in fresh]
        assert _proxy(deny, plain["key"]).status_code == 200  # nothing to decide
        r = _proxy(deny, limited["key"])
        _problem(r, 503, "LIMITS_UNAVAILABLE")
        assert r.headers["retry-after"] == "1"

        # Redis back: the cluster decides again, on every node.
        redis.start()
        _eventually(
            lambda: (
                clients[0]
                .post("/keys", json={"name": "x", "owner": "o"}, headers=admin)
                .status_code
                == 201
            )
        )

        # Each node notices within a health interval: a fresh key is then
        # limited exactly again, across all four.
        def exact_again() -> bool:
            again = _make_key(
                clients[0], admin, rate_limits=[{"name": "m", "limit": 3, "period_seconds": 60}]
            )
            _known_everywhere(clients, admin, again["id"])
            answers = _round_robin([*nodes, deny], again["key"], 12)
            return _codes(answers) == {"ok": 3, "429 RATE_LIMITED": 9}

        _eventually(exact_again, 20)
