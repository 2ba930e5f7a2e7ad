"""Credit operations and validate on real ``triogate serve`` cluster nodes
sharing one real Redis: an operation on one node is the balance every
node's next request meets, audited once; validate with ``spend`` decides
in Redis as a proxied request does; the CLI's operation is the same; bad
input answers 4xx with a code; Redis killed: 503 ``STORE_UNAVAILABLE``,
nothing applied, validate follows the fallback; Redis back: all works."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, run_cli, serving, threaded_upstream
from tests.redis_fixture import RedisServer, running_redis
from tests.test_cluster_limits_process import _codes, _make_key, _round_robin
from tests.test_cluster_process import SECRETS, _config, _eventually, _problem, _proxy

JSON = dict[str, Any]


@pytest.fixture(name="redis")
def _redis(tmp_path: Path) -> Iterator[RedisServer]:
    # Persistent: the outage restarts it and expects what it acknowledged.
    with running_redis(tmp_path / "redis", persistence=True) as server:
        yield server


def _op(client: httpx.Client, admin: dict[str, str], path: str, op: str, amount: Any) -> Any:
    return client.post(f"{path}/credits", json={"op": op, "amount": amount}, headers=admin)


def _balance(r: httpx.Response) -> tuple[int, int]:
    assert r.status_code == 200, r.text
    return r.json()["previous_remaining"], r.json()["credits_remaining"]


def _validate(client: httpx.Client, admin: dict[str, str], key: str, spend: int = 0) -> JSON:
    body: JSON = {"key": key} if not spend else {"key": key, "spend": spend}
    r = client.post("/keys/validate", json=body, headers=admin)
    assert r.status_code == 200, r.text
    out: JSON = r.json()
    return out


def _known(clients: list[httpx.Client], admin: dict[str, str], path: str) -> None:
    for client in clients:
        _eventually(lambda c=client: c.get(path, headers=admin).status_code == 200)


def test_credit_operations_and_validate_are_the_clusters(
    tmp_path: Path, redis: RedisServer
) -> None:
    with ExitStack() as stack:
        upstream = stack.enter_context(threaded_upstream())
        env = {"TRIOGATE_CLUSTER__REDIS_URL": redis.url, **SECRETS}
        nodes: list[ServeProcess] = [
            stack.enter_context(serving(_config(tmp_path, n, upstream), env=env)) for n in "ab"
        ]
        a, b = clients = [stack.enter_context(sp.client()) for sp in nodes]
        r = a.post("/setup", json={"name": "root", "email": "root@example.com"})
        assert r.status_code == 201, r.text
        admin = {"Authorization": f"Bearer {r.json()['key']}"}
        _eventually(lambda: b.get("/keys", headers=admin).status_code == 200)

        metered = _make_key(a, admin, credits={"remaining": 5})
        path = f"/keys/{metered['id']}"
        _known(clients, admin, path)
        assert _proxy(nodes[0], metered["key"]).status_code == 200  # Redis: 4

        # An increment on b applies to the cluster's 4, not to b's view (5).
        assert _balance(_op(b, admin, path, "increment", 6)) == (4, 10)
        answers = _round_robin(nodes, metered["key"], 14)
        assert _codes(answers) == {"ok": 10, "429 QUOTA_EXCEEDED": 4}
        # Audited once, seen on the other node.
        _eventually(
            lambda: a.get("/audit?action=credits.increment", headers=admin).json()["items"] != []
        )
        [entry] = a.get("/audit?action=credits.increment", headers=admin).json()["items"]
        assert entry["target_id"] == metered["id"]
        assert entry["details"] == {"amount": 6, "old": 4, "new": 10}

        # Set on a, decrement on b; past the balance: 409, nothing taken.
        assert _balance(_op(a, admin, path, "set", 3)) == (0, 3)
        r = _op(b, admin, path, "decrement", 4)
        _problem(r, 409, "INSUFFICIENT_CREDITS")
        assert r.json()["credits_remaining"] == 3
        assert _balance(_op(b, admin, path, "decrement", 1)) == (3, 2)

        # validate with spend: decided in Redis, never below zero.
        got = _validate(a, admin, metered["key"], spend=3)
        assert (got["valid"], got["code"], got["credits_remaining"]) == (
            False,
            "QUOTA_EXCEEDED",
            0,
        )
        got = _validate(b, admin, metered["key"], spend=2)
        assert got["valid"] is True and got["credits_remaining"] == 0
        assert _validate(a, admin, metered["key"])["credits_remaining"] == 0  # a peek
        assert _proxy(nodes[0], metered["key"]).status_code == 429

        # A rate-limited key: validate reports the cluster's limit state,
        # a peek takes nothing, a spend takes from the same limit.
        limited = _make_key(b, admin, rate_limits=[{"name": "m", "limit": 3, "period_seconds": 60}])
        _known(clients, admin, f"/keys/{limited['id']}")
        for client in clients:
            [state] = _validate(client, admin, limited["key"])["rate_limits"]
            assert (state["name"], state["limit"], state["remaining"]) == ("m", 3, 3)
        assert _validate(a, admin, limited["key"], spend=1)["valid"] is True
        assert _proxy(nodes[1], limited["key"]).status_code == 200
        [state] = _validate(b, admin, limited["key"])["rate_limits"]
        assert state["remaining"] == 1
        assert _validate(b, admin, limited["key"], spend=1)["valid"] is True
        got = _validate(a, admin, limited["key"], spend=1)
        assert (got["valid"], got["code"]) == (False, "RATE_LIMITED")
        assert _proxy(nodes[0], limited["key"]).status_code == 429

        # An identity's pool: an operation on one node, spent on the other.
        r = a.post(
            "/identities",
            json={"external_id": "cus_1", "credits": {"remaining": 1}},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        identity = r.json()["id"]
        pooled = _make_key(a, admin, identity_id=identity)
        _known(clients, admin, f"/keys/{pooled['id']}")
        assert _balance(_op(b, admin, f"/identities/{identity}", "increment", 2)) == (1, 3)
        answers = _round_robin(nodes, pooled["key"], 5)
        assert _codes(answers) == {"ok": 3, "429 QUOTA_EXCEEDED": 2}

        # Bad input: 4xx with a code, nothing changed.
        for body_op, amount in (
            ("set", -1),
            ("increment", 0),
            ("increment", "5"),
            ("increment", 1.5),
            ("set", 10**15 + 1),
            ("increment", 10**30),
            ("double", 1),
        ):
            _problem(_op(a, admin, path, body_op, amount), 400, "VALIDATION_ERROR")
        _problem(_op(a, admin, "/keys/key_nope", "set", 1), 404, "NOT_FOUND")
        _problem(_op(b, admin, "/identities/idn_nope", "set", 1), 404, "NOT_FOUND")
        plain = _make_key(a, admin)
        _problem(_op(a, admin, f"/keys/{plain['id']}", "set", 1), 409, "NO_CREDITS")
        assert _balance(_op(a, admin, path, "set", 10**15)) == (0, 10**15)
        _problem(_op(b, admin, path, "increment", 1), 400, "VALIDATION_ERROR")
        assert _balance(_op(b, admin, path, "set", 2)) == (10**15, 2)
        revoked = _make_key(a, admin, credits={"remaining": 5})
        assert a.delete(f"/keys/{revoked['id']}", headers=admin).status_code == 200
        _problem(_op(a, admin, f"/keys/{revoked['id']}", "set", 9), 409, "CONFLICT")

        # The CLI on a node's config and data directory: the same script run.
        cli = run_cli(
            "keys", "credits", metered["id"], "increment", "5", "--json",
            "-c", str(tmp_path / "b.toml"), env=env,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["credits_remaining"] == 7
        assert _validate(a, admin, metered["key"])["credits_remaining"] == 7

        # Redis killed: an operation answers 503, nothing applied; validate
        # with spend follows the fallback ("local": the last known balance).
        redis.kill()
        for client in clients:
            _problem(_op(client, admin, path, "increment", 100), 503, "STORE_UNAVAILABLE")
        cli = run_cli(
            "keys", "credits", metered["id"], "increment", "100",
            "-c", str(tmp_path / "a.toml"), env=env,
        )  # fmt: skip
        assert cli.returncode != 0 and "STORE_UNAVAILABLE" in cli.stdout + cli.stderr
        assert _validate(a, admin, metered["key"])["credits_remaining"] == 7
        got = _validate(a, admin, metered["key"], spend=1)
        assert got["valid"] is True and got["credits_remaining"] == 6

        # Redis back: the operations work again, on the balance as it was
        # (less what node a spent alone, charged by its next decision). Tried
        # every few ms while the node rejoins: each 503 changed nothing.
        redis.start()
        _eventually(lambda: _op(b, admin, path, "increment", 1).status_code == 200, 20)
        _eventually(lambda: _validate(a, admin, metered["key"])["credits_remaining"] == 7, 20)
        # Node b's decisions rejoin Redis by themselves too (until then it
        # answers from its last view, the 8 its own increment saw).
        _eventually(lambda: _validate(b, admin, metered["key"])["credits_remaining"] == 7, 20)
        for sp in nodes:
            assert sp.running, sp.stderr()
            assert "Traceback" not in sp.stderr(), sp.stderr()
