"""Proxy scenarios through both front doors: the native httptools listener and
the same pipeline served as an ASGI app by hypercorn. Real gateway, real
LMDB, real HTTP over loopback to a scripted upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from triogate.testing import FakeResponse, FakeUpstream, Harness, open_harness

FRONT_DOORS = ["native", "hypercorn"]


def routes(**extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "users",
            "methods": ["GET", "PUT"],
            "path": "/v{version:int}/users/{id:int}",
            "upstream": "test",
            "upstream_path": "/internal/users/{id}",
        },
        {
            "name": "users-me",
            "methods": ["GET"],
            "path": "/v{version:int}/users/me",
            "upstream": "test",
            "upstream_path": "/internal/me",
        },
        {"name": "echo", "path": "/echo/{rest:path}", "upstream": "test", **extra},
        {
            "name": "orders-1",
            "path": "/orders",
            "version": "1",
            "upstream": "test",
            "upstream_path": "/orders-v1",
        },
        {
            "name": "orders-2",
            "path": "/orders",
            "version": "2",
            "upstream": "test",
            "upstream_path": "/orders-v2",
        },
    ]


async def harness(
    tmp_path: Path, door: str, upstream: FakeUpstream, **kw: Any
) -> AsyncIterator[Harness]:
    async with open_harness(
        tmp_path,
        upstream=upstream,
        routes=kw.pop("routes", None) or routes(),
        server={"proxy_server": door},
        **kw,
    ) as h:
        yield h


@pytest.fixture(params=FRONT_DOORS)
def door(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def h(tmp_path: Path, door: str) -> AsyncIterator[Harness]:
    upstream = FakeUpstream()
    async for running in harness(tmp_path, door, upstream):
        yield running


async def test_get_passes_through_with_forwarded_headers(h: Harness) -> None:
    r = await h.client.get(
        "/echo/a/b%20c?x=1&y=two",
        headers={"x-custom": "kept", "connection": "keep-alive, x-drop", "x-drop": "gone"},
    )
    assert r.status_code == 200, r.text
    seen = h.upstream.requests[-1]
    assert seen.method == "GET"
    assert seen.target == "/echo/a/b%20c?x=1&y=two"
    assert seen.header("x-custom") == "kept"
    assert seen.header("x-drop") is None  # named in Connection: hop-by-hop
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == h.info.proxy_url.removeprefix("http://")
    assert seen.header("x-request-id") and len(seen.header("x-request-id") or "") >= 16
    assert seen.header("host") == h.upstream.url.removeprefix("http://")


async def test_post_body_reaches_upstream(h: Harness) -> None:
    r = await h.client.post("/echo/p", content=b"x" * 100_000)
    assert r.status_code == 200
    assert r.json()["body_bytes"] == 100_000
    assert h.upstream.requests[-1].body == b"x" * 100_000

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    r = await h.client.post("/echo/chunked", content=chunks())
    assert r.status_code == 200
    assert h.upstream.requests[-1].body == b"y" * 10_000


async def test_typed_params_rewrite_and_precedence(h: Harness) -> None:
    r = await h.client.get("/v1/users/42")
    assert r.status_code == 200
    assert h.upstream.requests[-1].target == "/internal/users/42"
    r = await h.client.get("/v2/users/me")
    assert r.status_code == 200
    assert h.upstream.requests[-1].target == "/internal/me"


async def test_routing_errors(h: Harness) -> None:
    sent = len(h.upstream.requests)
    r = await h.client.get("/nowhere")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "ROUTE_NOT_FOUND"
    r = await h.client.get("/v1/users/abc")
    assert r.status_code == 400
    assert r.json()["code"] == "INVALID_PATH_PARAMETER"
    r = await h.client.delete("/v1/users/42")
    assert r.status_code == 405
    assert r.json()["code"] == "METHOD_NOT_ALLOWED"
    assert r.headers["allow"] == "GET, HEAD, PUT"
    assert len(h.upstream.requests) == sent


async def test_accept_version_selects_route(h: Harness) -> None:
    r = await h.client.get("/orders", headers={"accept-version": "1"})
    assert r.status_code == 200
    assert h.upstream.requests[-1].target == "/orders-v1"
    r = await h.client.get("/orders")  # no header: the highest version
    assert h.upstream.requests[-1].target == "/orders-v2"
    r = await h.client.get("/orders", headers={"accept-version": "9"})
    assert r.status_code == 404
    assert r.json()["code"] == "ROUTE_NOT_FOUND"


async def test_deprecated_versions_carry_headers(tmp_path: Path, door: str) -> None:
    versions = {"1": {"deprecated": True, "sunset": "2027-06-30T00:00:00Z"}}
    async for h in harness(tmp_path, door, FakeUpstream(), api_versions=versions):
        r = await h.client.get("/v1/users/1")
        assert r.status_code == 200
        assert r.headers["deprecation"] == "true"
        assert r.headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
        r = await h.client.get("/v2/users/1")
        assert "deprecation" not in r.headers and "sunset" not in r.headers
        r = await h.client.get("/v1/users/x")  # errors on a deprecated version too
        assert r.status_code == 400


async def test_upstream_answers_pass_through_unchanged(tmp_path: Path, door: str) -> None:
    upstream = FakeUpstream(
        [
            FakeResponse(503, [("x-upstream", "yes"), ("retry-after", "7")], b"busy"),
            FakeResponse(404, [("content-type", "text/plain")], b"nope"),
            FakeResponse(200, [("content-type", "text/plain")], chunks=[b"a" * 10, b"b" * 20]),
        ]
    )
    async for h in harness(tmp_path, door, upstream):
        r = await h.client.get("/echo/1")
        assert (r.status_code, r.content, r.headers["x-upstream"]) == (503, b"busy", "yes")
        assert r.headers["retry-after"] == "7"
        r = await h.client.get("/echo/2")
        assert (r.status_code, r.content) == (404, b"nope")
        r = await h.client.get("/echo/3")
        assert r.status_code == 200
        assert r.content == b"a" * 10 + b"b" * 20


async def test_head_has_no_body(h: Harness) -> None:
    r = await h.client.head("/echo/x")
    assert r.status_code == 200
    assert r.content == b""
    assert h.upstream.requests[-1].method == "HEAD"
    r = await h.client.get("/echo/after-head")  # the connections are still fine
    assert r.status_code == 200


async def test_upstream_failures(tmp_path: Path, door: str) -> None:
    async for h in harness(tmp_path, door, FakeUpstream([FakeResponse(drop=True)])):
        r = await h.client.get("/echo/dropped")
        assert r.status_code == 502
        assert r.json()["code"] == "BAD_GATEWAY"
    closed = FakeUpstream()
    async for h in harness(
        tmp_path / "closed", door, closed, upstream_settings={"targets": ["http://127.0.0.1:9"]}
    ):
        r = await h.client.get("/echo/refused")
        assert r.status_code == 502
        assert r.json()["code"] == "BAD_GATEWAY"
        assert closed.requests == []


async def test_slow_upstream_is_504(tmp_path: Path, door: str) -> None:
    upstream = FakeUpstream([FakeResponse(delay=3)])
    async for h in harness(
        tmp_path, door, upstream, upstream_settings={"read_timeout_seconds": 0.5}
    ):
        with trio.fail_after(2.5):
            r = await h.client.get("/echo/slow")
        assert r.status_code == 504
        assert r.json()["code"] == "UPSTREAM_TIMEOUT"


async def test_keep_alive_pool_reuses_upstream_connections(h: Harness) -> None:
    for i in range(20):
        r = await h.client.get(f"/echo/{i}")
        assert r.status_code == 200
    # Sequential requests share one pooled upstream connection.
    assert h.upstream.connections <= 2


async def test_round_robin_over_targets(tmp_path: Path, door: str) -> None:
    a, b = FakeUpstream(), FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        async for h in harness(tmp_path, door, a, upstream_settings={"targets": [a.url, b.url]}):
            for i in range(10):
                assert (await h.client.get(f"/echo/{i}")).status_code == 200
        assert len(a.requests) == 5
        assert len(b.requests) == 5
        nursery.cancel_scope.cancel()


async def test_key_auth_and_key_stripped(tmp_path: Path, door: str) -> None:
    upstream = FakeUpstream()
    async for h in harness(
        tmp_path, door, upstream, routes=routes(plugins={"key-auth": {"scopes": ["e:read"]}})
    ):
        r = await h.client.get("/echo/x")
        assert r.status_code == 401
        assert r.json()["code"] == "MISSING_KEY"
        key = await h.create_key(["e:*"])
        r = await h.client.get("/echo/x", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200
        seen = h.upstream.requests[-1]
        assert seen.header("authorization") is None
        assert key not in str(seen.headers)
        weak = await h.create_key(["other"])
        r = await h.client.get("/echo/x", headers={"x-api-key": weak})
        assert r.status_code == 403
        assert r.json()["required_scopes"] == ["e:read"]
        assert len(h.upstream.requests) == 1
