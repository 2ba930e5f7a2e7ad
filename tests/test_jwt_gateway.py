"""The jwt plugin in a running gateway: the real server and native listener
on 127.0.0.1, real HTTP (httpx), a real JWKS endpoint on 127.0.0.1 whose
answers the tests change (rotated keys, garbage, a 503, a dropped
connection, nothing listening)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from tests.conftest import FakeClock
from tests.helpers_gateway import assert_problem, create_key, refused_config, setup_admin
from tests.helpers_jwt import (
    HS_SECRET,
    JwksServer,
    ec_key,
    hs_signed,
    jwk_of,
    make_token,
    pem_of,
    rsa_key,
    unsigned,
)
from triogate.plugins.jwt_auth import Jwt
from triogate.testing import FakeResponse, FakeUpstream, Harness, open_harness

ISSUER = "https://idp.test"
HS_KEY = {"kid": "hs", "algorithm": "HS256", "secret": HS_SECRET}


@asynccontextmanager
async def gateway(tmp_path: Any, jwt: dict[str, Any], **harness_kw: Any) -> AsyncIterator[Harness]:
    plugins = {"jwt": jwt, **harness_kw.pop("plugins", {})}
    async with open_harness(tmp_path / "data", plugins=plugins, **harness_kw) as h:
        yield h


@asynccontextmanager
async def jwks_server(keys: list[dict[str, Any]]) -> AsyncIterator[JwksServer]:
    server = JwksServer(keys)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


def plugin_of(h: Harness) -> Jwt:
    gw = h.server.gateway
    assert gw is not None
    found = [p for p in gw.pipeline.chains[0].plugins if isinstance(p, Jwt)]
    assert len(found) == 1
    return found[0]


async def until(condition: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    """Wait (bounded) for ``condition``."""
    with trio.move_on_after(seconds):
        while not condition():  # noqa: ASYNC110 (set by the gateway's own tasks)
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def headers_seen(upstream: FakeUpstream) -> dict[str, str]:
    return {k.lower(): v for k, v in upstream.requests[-1].headers}


async def raw_request(h: Harness, header: bytes) -> bytes:
    """A request with a header line no client library would send."""
    host, _, port = h.info.proxy_url.removeprefix("http://").partition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + header + b"\r\n"
        )
        answer = b""
        with trio.move_on_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


def assert_refused(r: httpx.Response, code: str) -> None:
    assert_problem(r, 401, code)
    assert r.headers["www-authenticate"].startswith('Bearer realm="triogate"')


# ---- inline keys ---------------------------------------------------------------------


async def test_hs256_rs256_es256_are_accepted(tmp_path: Any) -> None:
    upstream = FakeUpstream()
    settings = {
        "keys": [
            HS_KEY,
            {"kid": "rs", "algorithm": "RS256", "public_key": pem_of(rsa_key())},
            {"algorithm": "ES256", "public_key": pem_of(ec_key())},
        ]
    }
    async with gateway(tmp_path, settings, upstream=upstream) as h:
        for token, subject in [
            (make_token(HS_SECRET, "HS256", kid="hs", sub="hs-user"), "hs-user"),
            (make_token(rsa_key(), "RS256", kid="rs", sub="rs-user"), "rs-user"),
            (make_token(ec_key(), "ES256", sub="es-user"), "es-user"),
        ]:
            r = await h.client.get("/x", headers={**bearer(token), "X-Token-Subject": "forged"})
            assert r.status_code == 200, r.text
            seen = headers_seen(upstream)
            assert seen["x-token-subject"] == subject
            assert "authorization" not in seen  # hide_credentials
            assert [k for k, _ in upstream.requests[-1].headers].count("x-token-subject") == 1


async def test_hostile_tokens_are_refused_and_the_gateway_keeps_serving(tmp_path: Any) -> None:
    upstream = FakeUpstream()
    settings = {
        "keys": [HS_KEY, {"kid": "rs", "algorithm": "RS256", "public_key": pem_of(rsa_key())}],
        "issuers": [ISSUER],
        "audiences": ["api"],
    }
    now = time.time()
    good = {"iss": ISSUER, "aud": "api"}
    public = pem_of(rsa_key()).encode()
    forged = make_token(rsa_key(1), "RS256", kid="rs", **good)
    cases: list[tuple[dict[str, str], str]] = [
        ({}, "MISSING_TOKEN"),
        ({"Authorization": "Basic YTpi"}, "MISSING_TOKEN"),
        ({"Authorization": "Bearer"}, "MISSING_TOKEN"),
        (bearer("garbage"), "INVALID_TOKEN"),
        (bearer("a.b.c"), "INVALID_TOKEN"),
        (bearer(forged), "INVALID_TOKEN"),
        (bearer(unsigned({"sub": "eve", "exp": now + 60, **good})), "INVALID_TOKEN"),
        (bearer(unsigned({"sub": "eve", "exp": now + 60, **good}, kid="rs")), "INVALID_TOKEN"),
        (
            bearer(hs_signed(public, {"sub": "eve", "exp": now + 60, **good}, kid="rs")),
            "INVALID_TOKEN",
        ),
        (bearer(hs_signed(public, {"sub": "eve", "exp": now + 60, **good})), "INVALID_TOKEN"),
        (
            bearer(make_token(rsa_key(), "RS256", kid="rs", exp=int(now) - 60, **good)),
            "TOKEN_EXPIRED",
        ),
        (
            bearer(make_token(rsa_key(), "RS256", kid="rs", nbf=int(now) + 600, **good)),
            "INVALID_TOKEN",
        ),
        (
            bearer(make_token(rsa_key(), "RS256", kid="rs", iss="https://evil", aud="api")),
            "INVALID_TOKEN",
        ),
        (
            bearer(make_token(rsa_key(), "RS256", kid="rs", iss=ISSUER, aud="other")),
            "INVALID_TOKEN",
        ),
        (bearer(make_token(rsa_key(), "RS256", kid="rs", exp=None, **good)), "INVALID_TOKEN"),
        (bearer(make_token(rsa_key(1), "RS256", kid="unknown", **good)), "INVALID_TOKEN"),
    ]
    async with gateway(tmp_path, settings, upstream=upstream) as h:
        for headers, code in cases:
            r = await h.client.get("/x", headers=headers)
            assert_refused(r, code)
            if code == "MISSING_TOKEN":
                assert r.headers["www-authenticate"] == 'Bearer realm="triogate"'
            else:
                assert 'error="invalid_token"' in r.headers["www-authenticate"]
        # Raw bytes no client library would send.
        answer = await raw_request(h, b"Authorization: Bearer \xff\xfe.\x80.\xc3\r\n")
        assert answer.startswith(b"HTTP/1.1 401 ") and b'"INVALID_TOKEN"' in answer, answer
        assert upstream.requests == []
        ok = make_token(rsa_key(), "RS256", kid="rs", **good)
        assert (await h.client.get("/x", headers=bearer(ok))).status_code == 200


async def test_leeway_and_a_cached_token_expire_on_the_gateways_clock(tmp_path: Any) -> None:
    clock = FakeClock()
    token = make_token(HS_SECRET, "HS256", kid="hs", now=clock.now, exp=int(clock.now) + 60)
    settings = {"keys": [HS_KEY], "leeway_seconds": 5}
    async with gateway(tmp_path, settings, clock=clock) as h:
        for _ in range(3):
            assert (await h.client.get("/x", headers=bearer(token))).status_code == 200
        cache = plugin_of(h).cache
        assert (cache.hits, cache.misses) == (2, 1)  # verified once
        clock.advance(64)  # within the leeway
        assert (await h.client.get("/x", headers=bearer(token))).status_code == 200
        clock.advance(1)
        assert_refused(await h.client.get("/x", headers=bearer(token)), "TOKEN_EXPIRED")


async def test_a_route_without_keys_or_jwks_is_a_load_error(tmp_path: Any) -> None:
    error = await refused_config(tmp_path / "data", plugins={"jwt": {}})
    assert "jwt" in str(error) and "jwks" in str(error)


# ---- JWKS --------------------------------------------------------------------------


async def test_jwks_keys_verify_and_a_rotation_is_picked_up_on_refresh(tmp_path: Any) -> None:
    async with jwks_server([jwk_of(rsa_key(), "k1"), jwk_of(ec_key(), "e1")]) as jwks:
        settings = {
            "jwks": {"url": jwks.jwks_url, "refresh_seconds": 1, "min_refresh_seconds": 3600}
        }
        async with gateway(tmp_path, settings) as h:
            plugin = plugin_of(h)
            assert plugin.jwks is not None
            await until(lambda: "k1" in plugin.jwks.keys.by_kid, "the first fetch")  # type: ignore[union-attr]
            old = make_token(rsa_key(), "RS256", kid="k1")
            assert (await h.client.get("/x", headers=bearer(old))).status_code == 200
            es = make_token(ec_key(), "ES256", kid="e1")
            assert (await h.client.get("/x", headers=bearer(es))).status_code == 200
            # The issuer rotates: k2 in, k1 out.
            jwks.keys = [jwk_of(rsa_key(2), "k2")]
            await until(lambda: "k2" in plugin.jwks.keys.by_kid, "the refresh")  # type: ignore[union-attr]
            new = make_token(rsa_key(2), "RS256", kid="k2")
            assert (await h.client.get("/x", headers=bearer(new))).status_code == 200
            # k1 is gone: its token (verified and cached before) is refused now.
            assert_refused(await h.client.get("/x", headers=bearer(old)), "INVALID_TOKEN")


async def test_an_unknown_kid_fetches_early_once_and_rate_limited(tmp_path: Any) -> None:
    min_refresh = 0.5
    async with jwks_server([jwk_of(rsa_key(), "k1")]) as jwks:
        settings = {
            "jwks": {
                "url": jwks.jwks_url,
                "refresh_seconds": 300,
                "min_refresh_seconds": min_refresh,
            }
        }
        async with gateway(tmp_path, settings) as h:
            plugin = plugin_of(h)
            await until(lambda: "k1" in plugin.jwks.keys.by_kid, "the first fetch")  # type: ignore[union-attr]
            assert jwks.fetches == 1
            await trio.sleep(min_refresh + 0.1)
            jwks.keys = [jwk_of(rsa_key(), "k1"), jwk_of(rsa_key(2), "k2")]
            # The first k2 token makes the gateway fetch early, and waits for it.
            new = make_token(rsa_key(2), "RS256", kid="k2")
            assert (await h.client.get("/x", headers=bearer(new))).status_code == 200
            assert jwks.fetches == 2
            # A flood of tokens naming a kid nobody has: never a fetch each.
            started = trio.current_time()
            stray = make_token(rsa_key(3), "RS256", kid="k3")
            codes: list[int] = []

            async def one() -> None:
                codes.append((await h.client.get("/x", headers=bearer(stray))).status_code)

            for _ in range(10):
                await one()
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            elapsed = trio.current_time() - started
            assert codes == [401] * 30
            assert jwks.fetches - 2 <= 1 + elapsed / min_refresh, (jwks.fetches, elapsed)
            assert (await h.client.get("/x", headers=bearer(new))).status_code == 200


async def test_a_jwks_that_is_down_at_start(tmp_path: Any) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {"keys": [HS_KEY], "jwks": {"url": f"http://127.0.0.1:{port}/jwks.json"}}
    async with gateway(tmp_path, settings) as h:
        plugin = plugin_of(h)
        await until(lambda: plugin.jwks is not None and plugin.jwks.failures >= 1, "a failure")
        rs = make_token(rsa_key(), "RS256", kid="k1")
        for _ in range(3):
            assert_refused(await h.client.get("/x", headers=bearer(rs)), "INVALID_TOKEN")
        hs = make_token(HS_SECRET, "HS256", kid="hs")
        assert (await h.client.get("/x", headers=bearer(hs))).status_code == 200


async def test_a_jwks_failing_at_start_is_retried_with_backoff(tmp_path: Any) -> None:
    async with jwks_server([jwk_of(rsa_key(), "k1")]) as jwks:
        jwks.answer = FakeResponse(503, body=b"down for maintenance")
        settings = {"jwks": {"url": jwks.jwks_url, "min_refresh_seconds": 3600}}
        async with gateway(tmp_path, settings) as h:
            plugin = plugin_of(h)
            assert plugin.jwks is not None
            await until(lambda: plugin.jwks.failures >= 1, "a failure")  # type: ignore[union-attr]
            token = make_token(rsa_key(), "RS256", kid="k1")
            assert_refused(await h.client.get("/x", headers=bearer(token)), "INVALID_TOKEN")
            jwks.answer = None  # back (refresh_seconds is 300: the back-off retries)
            await until(lambda: "k1" in plugin.jwks.keys.by_kid, "a retry")  # type: ignore[union-attr]
            assert (await h.client.get("/x", headers=bearer(token))).status_code == 200


async def test_a_jwks_gone_bad_keeps_the_keys_it_had(tmp_path: Any) -> None:
    async with jwks_server([jwk_of(rsa_key(), "k1")]) as jwks:
        settings = {
            "jwks": {"url": jwks.jwks_url, "refresh_seconds": 1, "min_refresh_seconds": 0.1}
        }
        async with gateway(tmp_path, settings) as h:
            plugin = plugin_of(h)
            assert plugin.jwks is not None
            await until(lambda: "k1" in plugin.jwks.keys.by_kid, "the first fetch")  # type: ignore[union-attr]
            for answer in [
                FakeResponse(200, [("content-type", "text/html")], b"<html>oops</html>"),
                FakeResponse.json({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),
                FakeResponse(200, body=b"\xff" * 3000),
                FakeResponse(drop=True),
            ]:
                jwks.answer = answer
                failures = plugin.jwks.failures
                await until(lambda f=failures: plugin.jwks.failures > f, f"failing on {answer}")  # type: ignore[misc, union-attr]
                # A token never seen (not cached) with the known key: fine.
                fresh = make_token(rsa_key(), "RS256", kid="k1", jti=str(failures))
                assert (await h.client.get("/x", headers=bearer(fresh))).status_code == 200
                stray = make_token(rsa_key(3), "RS256", kid="k3")
                assert_refused(await h.client.get("/x", headers=bearer(stray)), "INVALID_TOKEN")


# ---- consumers: limits per subject, and next to key-auth ------------------------------


async def test_rate_limit_per_subject(tmp_path: Any) -> None:
    limit = {"limit": 2, "period_seconds": 60, "by": "consumer"}
    async with gateway(tmp_path, {"keys": [HS_KEY]}, plugins={"rate-limit": limit}) as h:

        async def status(sub: str, jti: str = "1") -> int:
            token = make_token(HS_SECRET, "HS256", kid="hs", sub=sub, jti=jti)
            return (await h.client.get("/x", headers=bearer(token))).status_code

        assert [await status("alice"), await status("alice")] == [200, 200]
        assert await status("alice") == 429
        assert await status("alice", jti="another token") == 429  # per subject, not token
        assert [await status("bob"), await status("bob"), await status("bob")] == [200, 200, 429]
        token = make_token(HS_SECRET, "HS256", kid="hs", sub="alice")
        r = await h.client.get("/x", headers=bearer(token))
        assert_problem(r, 429, "RATE_LIMITED")
        assert int(r.headers["retry-after"]) >= 1


async def test_a_route_with_key_auth_and_jwt_needs_both(tmp_path: Any) -> None:
    upstream = FakeUpstream()
    async with gateway(
        tmp_path, {"keys": [HS_KEY]}, plugins={"key-auth": {}}, upstream=upstream
    ) as h:
        admin = await setup_admin(h)
        key_id, key = await create_key(h, admin)
        token = make_token(HS_SECRET, "HS256", kid="hs", sub="alice")
        r = await h.client.get("/x", headers={**bearer(token), "X-API-Key": key})
        assert r.status_code == 200, r.text
        seen = headers_seen(upstream)
        assert seen["x-key-id"] == key_id and seen["x-token-subject"] == "alice"
        assert "authorization" not in seen and "x-api-key" not in seen
        assert_problem(await h.client.get("/x", headers=bearer(token)), 401, "MISSING_KEY")
        r = await h.client.get("/x", headers={"X-API-Key": key})
        assert_refused(r, "MISSING_TOKEN")
        assert_refused(await h.client.get("/x", headers=bearer(key)), "INVALID_TOKEN")
        assert len(upstream.requests) == 1
