"""Three (then four) real ``triogate serve`` nodes and one real Redis: the
records are the cluster's. Setup once; an admin and a key made on one node
work on the others; a revocation reaches every node within the issue's
1 s; Redis killed: known keys still 200, admin writes 503 problem+json;
Redis back: writes work and reach everyone; a node started last catches
up; a node killed does not disturb the others; a node with other secrets
refuses to start and writes nothing."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, run_cli, serving, threaded_upstream
from tests.redis_fixture import RedisServer, running_redis
from tests.test_reload import config_doc, route, write_doc

JSON = dict[str, Any]
SECRETS = {
    "TRIOGATE_HMAC_SECRET": "1:" + "h" * 40,
    "TRIOGATE_ENCRYPTION_KEYS": "1:" + base64.b64encode(b"e" * 32).decode(),
}
#: The issue's propagation bound: a change made on one node is in force on
#: every node within it.
PROPAGATION = 1.0


@pytest.fixture(name="redis")
def _redis(tmp_path: Path) -> Iterator[RedisServer]:
    # Persistent: the outage test restarts it and expects what it acknowledged.
    with running_redis(tmp_path / "redis", persistence=True) as server:
        yield server


def _config(tmp_path: Path, name: str, upstream: str) -> Path:
    doc = config_doc(
        tmp_path / name,
        {"a": upstream},
        [route("open", "/open", "a", plugins={"key-auth": {}})],
    )
    return write_doc(tmp_path / f"{name}.toml", doc)


def _env(redis: RedisServer, secrets: dict[str, str] = SECRETS) -> dict[str, str]:
    return {"TRIOGATE_CLUSTER__REDIS_URL": redis.url, **secrets}


def _eventually(check: Callable[[], bool], bound: float = 10.0) -> float:
    """Poll ``check`` every 2 ms until true, at most ``bound`` seconds;
    returns how long it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > bound:
            raise AssertionError(f"not true within {bound}s")
        time.sleep(0.002)
    return time.monotonic() - started


def _proxy(sp: ServeProcess, key: str) -> httpx.Response:
    return httpx.get(f"{sp.proxy_url}/open", headers={"X-API-Key": key}, timeout=5)


def _problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    assert r.json()["code"] == code, r.text


def test_three_nodes_share_records_and_ride_out_redis_loss(
    tmp_path: Path, redis: RedisServer
) -> None:
    with ExitStack() as stack:
        upstream = stack.enter_context(threaded_upstream())
        env = _env(redis)
        a, b, c = (
            stack.enter_context(serving(_config(tmp_path, n, upstream), env=env))
            for n in ("a", "b", "c")
        )
        clients = {
            n: stack.enter_context(sp.client()) for n, sp in zip("abc", (a, b, c), strict=True)
        }

        # /setup once per cluster; the admin made on a works on b and c.
        r = clients["a"].post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin = {"Authorization": f"Bearer {r.json()['key']}"}
        for n in "bc":
            _eventually(lambda n=n: clients[n].get("/keys", headers=admin).status_code == 200)
            r = clients[n].post("/setup", json={"name": "again", "email": "x@example.com"})
            _problem(r, 409, "CONFLICT")

        # A key made on b validates on a and c.
        r = clients["b"].post("/keys", json={"name": "k", "owner": "o"}, headers=admin)
        assert r.status_code == 201, r.text
        key, key_id = r.json()["key"], r.json()["id"]
        for sp in (a, b, c):
            _eventually(lambda sp=sp: _proxy(sp, key).status_code == 200)

        # Revoked on c: refused everywhere within the bound.
        kept = clients["a"].post("/keys", json={"name": "kept", "owner": "o"}, headers=admin)
        assert kept.status_code == 201, kept.text
        kept_key = kept.json()["key"]
        r = clients["c"].delete(f"/keys/{key_id}", headers=admin)
        assert r.status_code == 200, r.text
        for sp in (a, b, c):
            _eventually(lambda sp=sp: _proxy(sp, key).status_code == 401, PROPAGATION)
            assert _proxy(sp, key).json()["code"] == "KEY_REVOKED"
            _eventually(lambda sp=sp: _proxy(sp, kept_key).status_code == 200)

        # Health says each is in the cluster.
        for client in clients.values():
            health = client.get("/health").json()
            assert health["cluster"]["in_cluster"] is True, health
            assert health["cluster"]["lag_entries"] == 0, health

        # Redis killed: known keys still served, admin writes 503, reads go on.
        redis.kill()
        for n, sp in zip("abc", (a, b, c), strict=True):
            assert _proxy(sp, kept_key).status_code == 200
            assert _proxy(sp, key).status_code == 401
            r = clients[n].post("/keys", json={"name": "x", "owner": "o"}, headers=admin)
            _problem(r, 503, "STORE_UNAVAILABLE")
            assert clients[n].get("/keys", headers=admin).status_code == 200
            _eventually(
                lambda n=n: clients[n].get("/health").json()["cluster"]["state"] == "detached"
            )

        # Redis back (it kept what it acknowledged): writes work and reach everyone.
        redis.start()
        made: list[httpx.Response] = []

        def write_works() -> bool:
            r = clients["b"].post("/keys", json={"name": "after", "owner": "o"}, headers=admin)
            made.append(r)
            return r.status_code == 201

        _eventually(write_works, 20)
        after_key = made[-1].json()["key"]
        for sp in (a, b, c):
            _eventually(lambda sp=sp: _proxy(sp, after_key).status_code == 200)
        assert all(r.status_code in (201, 503) for r in made), [r.text for r in made]

        # A node started last catches up on everything.
        d = stack.enter_context(serving(_config(tmp_path, "d", upstream), env=env))
        _eventually(lambda: _proxy(d, after_key).status_code == 200)
        assert _proxy(d, key).status_code == 401
        dc = stack.enter_context(d.client())
        assert dc.get("/keys", headers=admin).status_code == 200

        # A node killed: the others do not notice, and it leaves the list.
        c.kill()
        r = clients["a"].post("/keys", json={"name": "late", "owner": "o"}, headers=admin)
        assert r.status_code == 201, r.text
        late_key = r.json()["key"]
        for sp in (b, d):
            _eventually(lambda sp=sp: _proxy(sp, late_key).status_code == 200)

        def listed() -> list[str]:
            r = clients["a"].get("/cluster", headers=admin)
            assert r.status_code == 200, r.text
            # A node's first beat may precede its listeners (admin_url null).
            return sorted(n["admin_url"] or "" for n in r.json()["items"])

        _eventually(lambda: listed() == sorted([a.url, b.url, d.url]), 15)
        metrics = clients["a"].get("/metrics").text
        assert "triogate_cluster_replica_lag_entries" in metrics
        assert "triogate_cluster_redis_rtt_seconds" in metrics


def test_a_node_with_other_secrets_refuses_to_start(tmp_path: Path, redis: RedisServer) -> None:
    with threaded_upstream() as upstream:
        with serving(_config(tmp_path, "a", upstream), env=_env(redis)):
            pass
        other = {**SECRETS, "TRIOGATE_HMAC_SECRET": "1:" + "x" * 40}
        for name, env in (
            ("wrong", _env(redis, other)),
            ("none", {"TRIOGATE_CLUSTER__REDIS_URL": redis.url}),
        ):
            cfg = _config(tmp_path, name, upstream)
            done = run_cli("serve", "-c", str(cfg), env=env, timeout=30)
            assert done.returncode == 1, (done.stdout, done.stderr)
            lines = [line for line in done.stderr.splitlines() if line.startswith("secrets:")]
            assert len(lines) == 1 and "cluster" in lines[0], done.stderr
            assert not (tmp_path / name).exists()  # nothing written


def _p(delays: list[float], q: float) -> float:
    ordered = sorted(delays)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e3


def test_propagation_between_processes(tmp_path: Path, redis: RedisServer) -> None:
    """A key created (then revoked) through node a's admin API, and the time
    until node b's proxy first accepts (refuses) it. Printed with ``-s``;
    the issue's bound (1 s) is the only assertion."""
    with ExitStack() as stack:
        upstream = stack.enter_context(threaded_upstream())
        env = _env(redis)
        a = stack.enter_context(serving(_config(tmp_path, "a", upstream), env=env))
        b = stack.enter_context(serving(_config(tmp_path, "b", upstream), env=env))
        ca = stack.enter_context(a.client())
        r = ca.post("/setup", json={"name": "root", "email": "root@example.com"})
        admin = {"Authorization": f"Bearer {r.json()['key']}"}
        proxy_b = stack.enter_context(httpx.Client(base_url=b.proxy_url, timeout=5))

        def status_on_b(key: str) -> int:
            return proxy_b.get("/open", headers={"X-API-Key": key}).status_code

        created: list[float] = []
        revoked: list[float] = []
        for i in range(100):
            r = ca.post("/keys", json={"name": f"k{i}", "owner": "o"}, headers=admin)
            assert r.status_code == 201, r.text
            key, key_id = r.json()["key"], r.json()["id"]
            acked = time.monotonic()
            _eventually(lambda key=key: status_on_b(key) == 200, PROPAGATION)
            created.append(time.monotonic() - acked)
            assert ca.delete(f"/keys/{key_id}", headers=admin).status_code == 200
            acked = time.monotonic()
            _eventually(lambda key=key: status_on_b(key) == 401, PROPAGATION)
            revoked.append(time.monotonic() - acked)
        print(
            f"\nbetween processes, from the admin answer on a to b's proxy: created "
            f"p50 {_p(created, 0.5):.1f} ms p99 {_p(created, 0.99):.1f} ms; revoked "
            f"p50 {_p(revoked, 0.5):.1f} ms p99 {_p(revoked, 0.99):.1f} ms"
        )
