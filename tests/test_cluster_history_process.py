"""Usage history on real ``triogate serve`` cluster nodes sharing one real
Redis: requests spread over two nodes come back as the cluster's totals on
either node (keys and identities); bad queries are the single node's 4xx;
Redis killed: a node answers its own history with ``partial: true``, never a
5xx; Redis back: the cluster's totals again, including what was counted
meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, serving, threaded_upstream
from tests.redis_fixture import RedisServer, running_redis
from tests.test_cluster_process import SECRETS, _eventually, _problem
from tests.test_reload import config_doc, route, write_doc

JSON = dict[str, Any]


@pytest.fixture(name="redis")
def _redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis", persistence=True) as server:
        yield server


def _config(tmp_path: Path, name: str, upstream: str) -> Path:
    doc = config_doc(
        tmp_path / name,
        {"a": upstream},
        [route("open", "/open", "a", plugins={"key-auth": {}})],
        storage={"flush_interval_seconds": 0.05},
    )
    return write_doc(tmp_path / f"{name}.toml", doc)


def _proxy(sp: ServeProcess, key: str) -> int:
    return httpx.get(f"{sp.proxy_url}/open", headers={"X-API-Key": key}, timeout=5).status_code


def _totals(client: httpx.Client, path: str, admin: dict[str, str]) -> JSON:
    r = client.get(path, params={"granularity": "minute"}, headers=admin)
    assert r.status_code == 200, r.text
    doc: JSON = r.json()
    return {
        "total": sum(i["total"] for i in doc["items"]),
        "allowed": sum(i["allowed"] for i in doc["items"]),
        "rate_limited": sum(i["rate_limited"] for i in doc["items"]),
        "partial": doc["partial"],
    }


def test_history_is_the_clusters_and_partial_without_redis(
    tmp_path: Path, redis: RedisServer
) -> None:
    with ExitStack() as stack:
        upstream = stack.enter_context(threaded_upstream())
        env = {"TRIOGATE_CLUSTER__REDIS_URL": redis.url, **SECRETS}
        a, b = (stack.enter_context(serving(_config(tmp_path, n, upstream), env=env)) for n in "ab")
        ca, cb = stack.enter_context(a.client()), stack.enter_context(b.client())
        r = ca.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin = {"Authorization": f"Bearer {r.json()['key']}"}
        r = ca.post("/identities", json={"external_id": "cust-1"}, headers=admin)
        assert r.status_code == 201, r.text
        identity = r.json()["id"]
        r = ca.post(
            "/keys",
            json={
                "name": "k",
                "owner": "o",
                "identity_id": identity,
                "rate_limits": [{"name": "m", "limit": 5, "period_seconds": 60}],
            },
            headers=admin,
        )
        assert r.status_code == 201, r.text
        key, key_id = r.json()["key"], r.json()["id"]
        _eventually(lambda: cb.get(f"/keys/{key_id}", headers=admin).status_code == 200)

        # 4 on a, 4 on b: 5 allowed (the cluster's limit), 3 rate-limited.
        codes = [_proxy(a if i % 2 else b, key) for i in range(8)]
        assert sorted(codes) == [200] * 5 + [429] * 3, codes
        expected = {"total": 8, "allowed": 5, "rate_limited": 3, "partial": False}
        for client in (ca, cb):
            for path in (f"/keys/{key_id}/usage/history", f"/identities/{identity}/usage/history"):
                _eventually(lambda c=client, p=path: _totals(c, p, admin) == expected, bound=15)

        # Bad queries: the single node's 4xx, never asked of Redis.
        path = f"/keys/{key_id}/usage/history"
        _problem(
            cb.get(path, params={"granularity": "week"}, headers=admin), 400, "VALIDATION_ERROR"
        )
        _problem(
            cb.get(
                path,
                params={"from": "2026-05-02T00:00:00Z", "to": "2026-05-01T00:00:00Z"},
                headers=admin,
            ),
            400,
            "VALIDATION_ERROR",
        )
        _problem(
            cb.get(
                path,
                params={
                    "granularity": "minute",
                    "from": "2026-05-01T00:00:00Z",
                    "to": "2026-05-03T00:00:00Z",
                },
                headers=admin,
            ),
            400,
            "VALIDATION_ERROR",
        )
        _problem(cb.get(path, params={"from": "yesterday"}, headers=admin), 400, "VALIDATION_ERROR")
        _problem(
            cb.get("/keys/key_01JD3W7Q8M4K2N6P0R5S9T1V3Y/usage/history", headers=admin),
            404,
            "NOT_FOUND",
        )

        # Redis killed: each node answers its own history, said to be partial.
        redis.kill()
        own = [_totals(c, path, admin) for c in (ca, cb)]
        assert all(t["partial"] is True for t in own), own
        assert sum(t["total"] for t in own) == 8, own
        assert _proxy(a, key) in (200, 429)  # counted on a meanwhile (fallback: local)
        _eventually(lambda: _totals(ca, path, admin)["total"] == own[0]["total"] + 1, bound=15)

        # Redis back: the cluster's totals, with what a counted meanwhile.
        redis.start()
        _eventually(
            lambda: all(
                (t := _totals(c, path, admin))["total"] == 9 and t["partial"] is False
                for c in (ca, cb)
            ),
            bound=20,
        )
