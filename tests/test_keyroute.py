"""key-auth admitting ``rate-limit`` by key in one step (``dataplane.keyroute``).

The fused admission must answer exactly as the two access phases in a row
did. Each scenario runs twice through the real gateway (real listener, real
LMDB, httpx over 127.0.0.1, the services' clock a ``FakeClock``): once as
planned (fused), once with the fusion turned off (the limiter offers none),
and the two traces must match: statuses, problem codes, the RateLimit,
Retry-After and X-Credits-Remaining headers, the actors' limiter state and
the usage. The traces cover the key's own limit refusing, its credits
running out, the route's limit refusing (the key's part given back), a later
plugin refusing (both given back), route-bound key limits, separate costs,
and a key with a plan and an identity (the two calls, fused or not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FakeClock
from tests.helpers_gateway import bearer, create_key, setup_admin
from tests.test_rate_limits import flush, gateway, route
from triogate.dataplane.plugin_services import ActorLimiter
from triogate.testing import Harness

HEADERS = (
    "ratelimit-policy",
    "ratelimit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "retry-after",
    "x-credits-remaining",
)


def _routes() -> list[dict[str, Any]]:
    limit2 = {"limit": 2, "period_seconds": 60, "by": "key"}
    return [
        route("fused", "/fused", {"key-auth": {}, "rate-limit": limit2}),
        route(
            "costly",
            "/costly",
            {"key-auth": {"cost": 2}, "rate-limit": {**limit2, "limit": 5, "cost": 3}},
        ),
        route(
            "guarded",
            "/guarded",
            {
                "key-auth": {},
                "rate-limit": {**limit2, "limit": 10},
                # Runs after rate-limit and refuses everyone: both parts given back.
                "ip-restriction": {"deny": ["127.0.0.0/8"], "after": ["rate-limit"]},
            },
        ),
        route("free", "/free", {"key-auth": {"cost": 0}, "rate-limit": limit2}),
    ]


def _snapshot(h: Harness, key_id: str) -> tuple[Any, ...]:
    gw = h.server.gateway
    assert gw is not None
    snap = gw.actors.actor(key_id).snapshot()
    return (snap.credits, sorted(snap.limits.items()), snap.requests)


async def _trace(h: Harness, clock: FakeClock) -> list[Any]:
    admin = await setup_admin(h)
    trace: list[Any] = []

    async def get(path: str, auth: dict[str, str]) -> None:
        r = await h.client.get(path, headers=auth)
        code = r.json().get("code") if r.status_code >= 400 else None
        trace.append((path, r.status_code, code, [(n, r.headers.get(n)) for n in HEADERS]))

    keys = {
        # The route's limit refuses the third; the key's part is given back.
        "plain": {"credits": {"remaining": 10}},
        # The key's own limit refuses first: the route's is never reached.
        "own": {"rate_limits": [{"name": "one", "limit": 1, "period_seconds": 30}]},
        # Credits run out before the route's limit.
        "poor": {
            "credits": {"remaining": 1},
            "rate_limits": [{"name": "ten", "limit": 10, "period_seconds": 60}],
        },
        # A key limit bound to another route: not met here.
        "bound": {
            "credits": {"remaining": 50},
            "rate_limits": [
                {"name": "elsewhere", "limit": 1, "period_seconds": 60, "routes": ["nope"]},
                {"name": "here", "limit": 3, "period_seconds": 60, "routes": ["fused"]},
            ],
        },
    }
    # A key with a plan and an identity (a ``KeyAccess``): the two calls.
    r = await h.admin.post(
        "/plans",
        json={"name": "pro", "rate_limits": [{"name": "plan", "limit": 4, "period_seconds": 60}]},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    plan_id = r.json()["id"]
    r = await h.admin.post(
        "/identities", json={"external_id": "cus_1", "credits": {"remaining": 6}}, headers=admin
    )
    assert r.status_code == 201, r.text
    keys["planned"] = {"plan_id": plan_id, "identity_id": r.json()["id"]}
    ids: dict[str, str] = {}
    for name, fields in keys.items():
        key_id, key = await create_key(h, admin, **fields)
        ids[name] = key_id
        auth = bearer(key)
        for path in ("/fused/x", "/fused/x", "/fused/x", "/costly/x", "/costly/x"):
            await get(path, auth)
        for path in ("/guarded/x", "/free/x", "/free/x", "/free/x"):
            await get(path, auth)
        clock.advance(31)
        for path in ("/fused/x", "/costly/x", "/guarded/x"):
            await get(path, auth)
    await flush(h)
    for name, key_id in ids.items():
        trace.append((name, _snapshot(h, key_id)))
        r = await h.admin.get(f"/keys/{key_id}/usage", headers=admin)
        doc = r.json()
        trace.append((name, doc["credits_remaining"], doc["requests"]))
    return trace


async def _run(data: Path, *, fused: bool) -> list[Any]:
    clock = FakeClock()
    async with gateway(data, routes=_routes(), clock=clock) as h:
        gw = h.server.gateway
        assert gw is not None
        names = [r.name for r in gw.pipeline.config.routes]
        for name, plugins in (("fused", 2), ("costly", 2), ("guarded", 3), ("free", 2)):
            chain = gw.pipeline.chains[names.index(name)]
            # Fused: key-auth's phase does rate-limit's too.
            assert len(chain.access) == (plugins - 1 if fused else plugins), (name, chain)
        return await _trace(h, clock)


async def test_fused_admission_answers_as_the_two_phases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused = await _run(tmp_path / "fused", fused=True)
    monkeypatch.setattr(ActorLimiter, "key_route_admission", lambda self, limit, cost: None)
    apart = await _run(tmp_path / "apart", fused=False)
    assert len(fused) == len(apart)
    for one, other in zip(fused, apart, strict=True):
        assert one == other
    # The scenarios do meet every outcome.
    codes = {entry[2] for entry in fused if len(entry) == 4}
    assert codes == {None, "RATE_LIMITED", "QUOTA_EXCEEDED", "FORBIDDEN"}, codes


async def test_not_fused_with_a_plugin_between(tmp_path: Path) -> None:
    """Only adjacent phases fuse: a plugin between key-auth and rate-limit
    keeps its place (and the request its order)."""
    routes = [
        route(
            "between",
            "/between",
            {
                "key-auth": {},
                "request-size-limiting": {"allowed_payload_bytes": 10, "after": ["key-auth"]},
                "rate-limit": {"limit": 2, "period_seconds": 60, "by": "key"},
            },
        ),
        route(
            "by-ip",
            "/by-ip",
            {"key-auth": {}, "rate-limit": {"limit": 2, "period_seconds": 60, "by": "ip"}},
        ),
    ]
    async with gateway(tmp_path / "data", routes=routes) as h:
        gw = h.server.gateway
        assert gw is not None
        assert [len(c.access) for c in gw.pipeline.chains.values()] == [3, 2]
