"""Webhook events once per cluster, with real ``triogate serve`` nodes, a
real Redis and a real receiver on 127.0.0.1 (tests/helpers_webhooks.py):

* three nodes: keys created on several nodes, credits spent, a rate limit
  exceeded and an expired key used on every node: each event arrives once
  (no node tells what another told), signed, with a stable id;
* a receiver that is down, then Redis killed while the events are pending:
  nothing is lost, nothing arrives twice beyond at-least-once (deduplicated
  by the event id, every event is there exactly once), and a
  ``rate_limit.exceeded`` seen while Redis was away arrives once it is back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, free_ports, serving, threaded_upstream
from tests.helpers_webhooks import Receiver, wait_for
from tests.redis_fixture import RedisServer, running_redis
from tests.test_cluster_process import SECRETS, _eventually
from tests.test_reload import config_doc, route, write_doc

JSON = dict[str, Any]
SECRET = "s" * 40
EVENTS = ["key.created", "credits.low", "rate_limit.exceeded", "key.expired"]


@pytest.fixture(name="redis")
def _redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis", persistence=True) as server:
        yield server


def _config(tmp_path: Path, name: str, upstream: str, hook: str) -> Path:
    doc = config_doc(
        tmp_path / name,
        {"a": upstream},
        [route("open", "/open", "a", plugins={"key-auth": {}})],
        storage={"flush_interval_seconds": 0.1},
        events={
            "timeout_seconds": 0.5,
            "retry_base_seconds": 0.2,
            "retry_max_seconds": 0.8,
            "max_attempts": 30,
            "webhooks": [{"name": "shop", "url": hook, "events": EVENTS, "secret": SECRET}],
        },
    )
    return write_doc(tmp_path / f"{name}.toml", doc)


def _proxy(sp: ServeProcess, key: str) -> httpx.Response:
    return httpx.get(f"{sp.proxy_url}/open", headers={"X-API-Key": key}, timeout=5)


def _start(
    stack: ExitStack, tmp_path: Path, redis: RedisServer, hook: str, names: str
) -> tuple[list[ServeProcess], list[httpx.Client], dict[str, str]]:
    upstream = stack.enter_context(threaded_upstream())
    env = {"TRIOGATE_CLUSTER__REDIS_URL": redis.url, **SECRETS}
    nodes = [
        stack.enter_context(serving(_config(tmp_path, n, upstream, hook), env=env)) for n in names
    ]
    clients = [stack.enter_context(sp.client()) for sp in nodes]
    r = clients[0].post("/setup", json={"name": "root", "email": "root@example.com"})
    assert r.status_code == 201, r.text
    admin = {"Authorization": f"Bearer {r.json()['key']}"}
    for client in clients[1:]:
        _eventually(lambda c=client: c.get("/keys", headers=admin).status_code == 200)
    return nodes, clients, admin


def _create(client: httpx.Client, admin: dict[str, str], **fields: Any) -> JSON:
    r = client.post("/keys", json={"name": "k", "owner": "o", **fields}, headers=admin)
    assert r.status_code == 201, r.text
    body: JSON = r.json()
    return body


def _known(clients: list[httpx.Client], admin: dict[str, str], key_id: str) -> None:
    for client in clients:
        _eventually(lambda c=client: c.get(f"/keys/{key_id}", headers=admin).status_code == 200)


def _by_type(receiver: Receiver) -> Counter[str]:
    return Counter(e["type"] for e in receiver.events())


def test_each_event_once_per_cluster(tmp_path: Path, redis: RedisServer) -> None:
    with Receiver() as receiver, ExitStack() as stack:
        nodes, clients, admin = _start(stack, tmp_path, redis, receiver.url, "abc")
        metered = _create(clients[0], admin, credits={"remaining": 10, "low_at_percent": [50, 0]})
        limited = _create(
            clients[1], admin, rate_limits=[{"name": "m", "limit": 1, "period_seconds": 60}]
        )
        soon = datetime.now(UTC) + timedelta(seconds=1.5)
        expiring = _create(clients[2], admin, expires_at=soon.isoformat())
        for made in (metered, limited, expiring):
            _known(clients, admin, made["id"])
        wait_for(lambda: len(receiver.events("key.created")) == 3, "three key.created")

        # 12 requests round-robin: 10 served, credits.low at 5 and at 0, once each.
        codes = [_proxy(nodes[i % 3], metered["key"]).status_code for i in range(12)]
        assert codes == [200] * 10 + [429] * 2, codes
        # 1 a minute, 9 requests over three nodes: every node sees refusals.
        codes = [_proxy(nodes[i % 3], limited["key"]).status_code for i in range(9)]
        assert codes == [200] + [429] * 8, codes
        # The expired key used twice on every node.
        wait_for(lambda: datetime.now(UTC) > soon + timedelta(seconds=0.2), "the expiry")
        for sp in nodes * 2:
            r = _proxy(sp, expiring["key"])
            assert r.status_code == 401 and r.json()["code"] == "KEY_EXPIRED", r.text

        wanted = {"key.created": 3, "credits.low": 2, "rate_limit.exceeded": 1, "key.expired": 1}
        try:
            wait_for(lambda: _by_type(receiver) == wanted, f"{wanted}")
        except AssertionError as exc:
            logs = "\n".join(sp.stderr()[-3000:] for sp in nodes)
            raise AssertionError(f"{exc}; got {_by_type(receiver)}\n{logs}") from None
        # Give a late duplicate time to show up (every node's writer runs
        # every 0.5 s and its deliverer polls every second): none does.
        for sp in nodes:
            _proxy(sp, limited["key"])  # more refusals: still within the minute
        wait_for(lambda: all(c.get("/health").status_code == 200 for c in clients), "health")
        deadline = datetime.now(UTC) + timedelta(seconds=2.5)
        wait_for(lambda: datetime.now(UTC) > deadline, "a quiet while")
        assert _by_type(receiver) == wanted

        low = sorted(receiver.events("credits.low"), key=lambda e: -e["data"]["remaining"])
        assert [(e["data"]["threshold_percent"], e["data"]["remaining"]) for e in low] == [
            (50, 5),
            (0, 0),
        ]
        assert [e["data"]["key_id"] for e in receiver.events("rate_limit.exceeded")] == [
            limited["id"]
        ]
        assert [e["data"]["key_id"] for e in receiver.events("key.expired")] == [expiring["id"]]
        assert all(d.signed_by(SECRET) for d in receiver.deliveries())
        ids = [e["id"] for e in receiver.events()]
        assert len(set(ids)) == len(ids)


def test_receiver_down_and_redis_killed_lose_nothing(tmp_path: Path, redis: RedisServer) -> None:
    (port,) = free_ports(1)
    receiver = Receiver(port=port)  # not started: down
    with ExitStack() as stack:
        stack.callback(receiver.stop)
        nodes, clients, admin = _start(stack, tmp_path, redis, receiver.url, "ab")
        made = [_create(clients[i % 2], admin)["id"] for i in range(4)]
        limited = _create(
            clients[0], admin, rate_limits=[{"name": "m", "limit": 1, "period_seconds": 60}]
        )
        _known(clients, admin, limited["id"])
        # Tried and failed on each node: the deliveries are pending there.
        for client in clients:
            _eventually(
                lambda c=client: any(
                    d["attempts"]
                    for d in c.get("/events/deliveries", headers=admin).json()["items"]
                ),
                bound=15,
            )

        # Redis killed while the events are pending, and a refusal on each
        # node meanwhile (fallback "local": each node admits one itself).
        redis.kill()
        for sp in nodes:
            assert [_proxy(sp, limited["key"]).status_code for _ in range(2)] == [200, 429]
        receiver.start()
        wait_for(
            lambda: len(receiver.events("key.created")) == 5,
            f"five key.created, got {_by_type(receiver)}",
        )
        assert not receiver.events("rate_limit.exceeded")  # waiting for Redis to claim it

        redis.start()
        wait_for(
            lambda: len(receiver.events("rate_limit.exceeded")) == 1,
            f"one rate_limit.exceeded, got {_by_type(receiver)}",
        )
        deadline = datetime.now(UTC) + timedelta(seconds=2.5)
        wait_for(lambda: datetime.now(UTC) > deadline, "a quiet while")
        events = receiver.events()
        by_id = {e["id"]: e for e in events}  # what a receiver deduplicating by id keeps
        assert Counter(e["type"] for e in by_id.values()) == {
            "key.created": 5,
            "rate_limit.exceeded": 1,
        }
        assert sorted(
            e["data"]["key_id"] for e in by_id.values() if e["type"] == "key.created"
        ) == sorted([*made, limited["id"]])
        assert all(d.signed_by(SECRET) for d in receiver.deliveries())
