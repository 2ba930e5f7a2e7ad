"""The built-in plugins, end to end: the real gateway (native listener, real
LMDB in a temp dir) in front of a scripted h11 upstream, driven with httpx over
loopback. Every test checks both what the client got and what the upstream
received (or that it received nothing)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import trio

from tests.conftest import FakeClock
from tests.helpers_gateway import assert_problem, bearer, refused_config, setup_admin
from triogate.control.keyformat import KeyFormat
from triogate.testing import FakeResponse, FakeUpstream, Harness, RecordedRequest, open_harness

ORIGIN = "https://app.example"
OTHER_ORIGIN = "https://evil.example"


# ---- helpers ----------------------------------------------------------------------


def values(request: RecordedRequest, name: str) -> list[str]:
    name = name.lower()
    return [v for k, v in request.headers if k == name]


def only_request(upstream: FakeUpstream) -> RecordedRequest:
    assert len(upstream.requests) == 1, upstream.requests
    return upstream.requests[0]


async def key_with_id(h: Harness, scopes: Sequence[str] = (), **fields: Any) -> tuple[str, str]:
    """A new API key and its id."""
    key = await h.create_key(scopes, **fields)
    assert h.server.gateway is not None
    result = await h.server.gateway.keys.validate(key)
    assert result.key_id is not None
    return key, result.key_id


async def start_fails(tmp_path: Path, **kw: Any) -> list[str]:
    """Open a harness that must not start; return the ConfigError's lines."""
    err = await refused_config(tmp_path, **kw)
    assert err.errors
    return err.lines()


async def chunks(pieces: Sequence[bytes], pause: float = 0.0) -> AsyncIterator[bytes]:
    for piece in pieces:
        if pause:
            await trio.sleep(pause)
        yield piece


# ---- key-auth -----------------------------------------------------------------------

KEY_AUTH: dict[str, dict[str, Any]] = {"key-auth": {}}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"X-API-Key": ""},
    ],
    ids=["none", "basic", "bearer-no-token", "empty-x-api-key"],
)
async def test_key_auth_missing_key(tmp_path: Path, headers: dict[str, str]) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        r = await h.client.get("/things", headers=headers)
        assert_problem(r, 401, "MISSING_KEY")
    assert upstream.requests == []


async def test_key_auth_invalid_keys(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        good = await h.create_key()
        # the last checksum character changed: well-shaped, wrong checksum
        bad_checksum = good[:-1] + ("A" if good[-1] != "A" else "B")
        unknown = KeyFormat("tg_").generate()  # well formed, never issued
        admin_headers = await setup_admin(h)
        admin_key = admin_headers["Authorization"].removeprefix("Bearer ")
        assert admin_key.startswith("tgadm_")
        candidates = {
            "malformed": "not-a-key",
            "truncated": good[:-3],
            "bad-checksum": bad_checksum,
            "unknown": unknown,
            "admin-key": admin_key,
        }
        for label, candidate in candidates.items():
            for headers in (bearer(candidate), {"X-API-Key": candidate}):
                r = await h.client.get("/things", headers=headers)
                assert_problem(r, 401, "INVALID_KEY")
                assert candidate not in r.text, label
        assert upstream.requests == []
        # the genuine key still works (the scheme is case-insensitive)
        r = await h.client.get("/things", headers={"Authorization": f"bearer {good}"})
        assert r.status_code == 200, r.text
    assert only_request(upstream).header("authorization") is None


async def test_key_auth_key_never_reaches_upstream(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        key, key_id = await key_with_id(h)
        r1 = await h.client.get("/a", headers=bearer(key))
        r2 = await h.client.get("/b", headers={"X-API-Key": key})
        # a forged X-Key-ID from the client is replaced by the real one
        r3 = await h.client.get("/c", headers={"X-API-Key": key, "X-Key-ID": "key_forged"})
        for r in (r1, r2, r3):
            assert r.status_code == 200, r.text
    assert [q.path for q in upstream.requests] == ["/a", "/b", "/c"]
    for req in upstream.requests:
        assert req.header("authorization") is None
        assert req.header("x-api-key") is None
        assert values(req, "x-key-id") == [key_id]
        assert all(key not in v for _, v in req.headers)


async def test_client_key_id_never_reaches_upstream_without_key_auth(tmp_path: Path) -> None:
    """An upstream may trust X-Key-ID: a client cannot send one, on any route."""
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins={"request-id": {}}, upstream=upstream) as h:
        r = await h.client.get("/open", headers={"X-Key-ID": "key_forged"})
    assert r.status_code == 200
    assert values(only_request(upstream), "x-key-id") == []


async def test_key_auth_hide_credentials_false(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"key-auth": {"hide_credentials": False}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        key, key_id = await key_with_id(h)
        r1 = await h.client.get("/a", headers={**bearer(key), "X-Key-ID": "key_forged"})
        r2 = await h.client.get("/b", headers={"X-API-Key": key})
        assert r1.status_code == r2.status_code == 200
    first, second = upstream.requests
    assert first.header("authorization") == f"Bearer {key}"
    assert values(first, "x-key-id") == [key_id]
    assert second.header("x-api-key") == key
    assert values(second, "x-key-id") == [key_id]


async def test_key_auth_revoked_through_admin_api(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        admin = await setup_admin(h)
        r = await h.admin.post("/keys", json={"name": "k", "owner": "o"}, headers=admin)
        assert r.status_code == 201, r.text
        key, key_id = r.json()["key"], r.json()["id"]
        assert (await h.client.get("/x", headers=bearer(key))).status_code == 200
        r = await h.admin.delete(f"/keys/{key_id}", headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "revoked"
        revoked_at = trio.current_time()
        r = await h.client.get("/x", headers=bearer(key))
        elapsed = trio.current_time() - revoked_at
        assert_problem(r, 401, "KEY_REVOKED")
        assert elapsed < 1.0
        assert_problem(await h.client.get("/x", headers={"X-API-Key": key}), 401, "KEY_REVOKED")
    assert len(upstream.requests) == 1


async def test_key_auth_revoked_by_cli_in_another_process(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        key, key_id = await key_with_id(h)
        assert (await h.client.get("/x", headers=bearer(key))).status_code == 200
        cmd = [
            sys.executable,
            "-m",
            "triogate",
            "keys",
            "revoke",
            key_id,
            "--data-dir",
            str(h.info.data_dir),
        ]
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        returned = trio.current_time()
        assert done.returncode == 0, done.stderr.decode()
        assert key_id in done.stdout.decode()
        r = await h.client.get("/x", headers=bearer(key))
        elapsed = trio.current_time() - returned
        assert_problem(r, 401, "KEY_REVOKED")
        assert elapsed < 1.0
    assert len(upstream.requests) == 1


async def test_key_auth_expired(tmp_path: Path, clock: FakeClock) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream, clock=clock) as h:
        expires = datetime.fromtimestamp(clock.now, UTC) + timedelta(seconds=1.5)
        key = await h.create_key(expires_at=expires)
        clock.advance(1.25)
        assert (await h.client.get("/x", headers=bearer(key))).status_code == 200
        clock.advance(0.25)  # at expires_at: expired
        assert_problem(await h.client.get("/x", headers=bearer(key)), 401, "KEY_EXPIRED")
    assert len(upstream.requests) == 1


async def test_key_auth_expired_after_patch(tmp_path: Path, clock: FakeClock) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream, clock=clock) as h:
        admin = await setup_admin(h)
        key, key_id = await key_with_id(h)
        expires = datetime.fromtimestamp(clock.now, UTC) + timedelta(seconds=1)
        r = await h.admin.patch(
            f"/keys/{key_id}", json={"expires_at": expires.isoformat()}, headers=admin
        )
        assert r.status_code == 200, r.text
        clock.advance(0.75)
        assert (await h.client.get("/x", headers=bearer(key))).status_code == 200
        clock.advance(0.25)  # at expires_at: expired
        assert_problem(await h.client.get("/x", headers=bearer(key)), 401, "KEY_EXPIRED")
    assert len(upstream.requests) == 1


async def test_key_auth_rotated_without_grace(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        admin = await setup_admin(h)
        old, old_id = await key_with_id(h, ["users:read"])
        r = await h.admin.post(f"/keys/{old_id}/rotate", json={"grace_seconds": 0}, headers=admin)
        assert r.status_code in (200, 201), r.text
        new, new_id = r.json()["new"]["key"], r.json()["new"]["id"]
        assert_problem(await h.client.get("/x", headers=bearer(old)), 401, "KEY_ROTATED")
        assert (await h.client.get("/x", headers=bearer(new))).status_code == 200
    req = only_request(upstream)
    assert values(req, "x-key-id") == [new_id]


async def test_key_auth_rotated_within_grace(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, plugins=KEY_AUTH, upstream=upstream) as h:
        admin = await setup_admin(h)
        old, old_id = await key_with_id(h)
        r = await h.admin.post(f"/keys/{old_id}/rotate", json={"grace_seconds": 60}, headers=admin)
        assert r.status_code in (200, 201), r.text
        new, new_id = r.json()["new"]["key"], r.json()["new"]["id"]
        assert (await h.client.get("/old", headers=bearer(old))).status_code == 200
        assert (await h.client.get("/new", headers=bearer(new))).status_code == 200
    by_path = {q.path: q for q in upstream.requests}
    assert values(by_path["/old"], "x-key-id") == [old_id]
    assert values(by_path["/new"], "x-key-id") == [new_id]


async def test_key_auth_insufficient_scope(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"key-auth": {"scopes": ["users:read", "orders:write"]}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        partial = await h.create_key(["users:read"])
        none = await h.create_key([])
        body = assert_problem(
            await h.client.get("/x", headers=bearer(partial)), 403, "INSUFFICIENT_SCOPE"
        )
        assert body["required_scopes"] == ["orders:write"]
        body = assert_problem(
            await h.client.get("/x", headers=bearer(none)), 403, "INSUFFICIENT_SCOPE"
        )
        assert sorted(body["required_scopes"]) == ["orders:write", "users:read"]
        # scopes are case-sensitive
        upper = await h.create_key(["USERS:READ", "orders:write"])
        body = assert_problem(
            await h.client.get("/x", headers=bearer(upper)), 403, "INSUFFICIENT_SCOPE"
        )
        assert body["required_scopes"] == ["users:read"]
        assert upstream.requests == []
        # wildcards: users:* grants users:read
        wild, wild_id = await key_with_id(h, ["users:*", "orders:write"])
        assert (await h.client.get("/x", headers=bearer(wild))).status_code == 200
    assert values(only_request(upstream), "x-key-id") == [wild_id]


# ---- request-id ---------------------------------------------------------------------


async def test_request_id_echoed_and_forwarded(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, global_plugins={"request-id": {}}, upstream=upstream) as h:
        r1 = await h.client.get("/a")
        r2 = await h.client.get("/b")
        kept = await h.client.get("/c", headers={"X-Request-ID": "client-id.42:x_y"})
        bad = await h.client.get("/d", headers={"X-Request-ID": "has space/and,comma"})
    a, b, c, d = upstream.requests
    assert r1.headers["x-request-id"] == a.header("x-request-id")
    assert r2.headers["x-request-id"] == b.header("x-request-id")
    assert r1.headers["x-request-id"] != r2.headers["x-request-id"]
    assert kept.headers.get_list("x-request-id") == ["client-id.42:x_y"]
    assert values(c, "x-request-id") == ["client-id.42:x_y"]
    # an id that is not a sane token is replaced, consistently on both sides
    assert bad.headers["x-request-id"] != "has space/and,comma"
    assert values(d, "x-request-id") == [bad.headers["x-request-id"]]


async def test_request_id_custom_header_name(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"request-id": {"header_name": "X-Correlation-ID"}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/a")
        kept = await h.client.get("/b", headers={"X-Request-ID": "abc-123"})
    a, b = upstream.requests
    assert r.status_code == 200
    assert r.headers["x-correlation-id"] == a.header("x-request-id")
    assert "x-request-id" not in r.headers
    assert kept.headers["x-correlation-id"] == "abc-123" == b.header("x-request-id")


async def test_request_id_on_errors(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(
        tmp_path,
        path="/api/{rest:path}",
        plugins=KEY_AUTH,
        global_plugins={"request-id": {}, "cors": {}},
        upstream=upstream,
    ) as h:
        r401 = await h.client.get("/api/x")
        r404 = await h.client.get("/elsewhere", headers={"Origin": ORIGIN})
        kept = await h.client.get("/api/x", headers={"X-Request-ID": "trace-7"})
    body = assert_problem(r401, 401, "MISSING_KEY")
    assert r401.headers["x-request-id"] == body["request_id"]
    body = assert_problem(r404, 404, "ROUTE_NOT_FOUND")
    assert r404.headers["x-request-id"] == body["request_id"]
    # the global plugins' response phases run on an unrouted request too
    assert r404.headers["access-control-allow-origin"] == "*"
    body = assert_problem(kept, 401, "MISSING_KEY")
    assert body["request_id"] == kept.headers["x-request-id"] == "trace-7"
    assert upstream.requests == []


# ---- cors ---------------------------------------------------------------------------


def preflight_headers(origin: str = ORIGIN, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type, x-api-key",
    }


async def test_cors_preflight_answered_before_key_auth(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {
        "key-auth": {},
        "cors": {
            "allow_origins": [ORIGIN],
            "allow_methods": ["GET", "POST"],
            "allow_credentials": True,
            "max_age_seconds": 123,
        },
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.options("/things", headers=preflight_headers())
        denied = await h.client.options("/things", headers=preflight_headers(OTHER_ORIGIN))
        bad_method = await h.client.options("/things", headers=preflight_headers(method="PUT"))
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-methods"] == "GET, POST"
    assert r.headers["access-control-allow-headers"] == "content-type, x-api-key"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["access-control-max-age"] == "123"
    assert "Origin" in r.headers.get_list("vary")
    for refused in (denied, bad_method):
        assert refused.status_code == 204
        assert "access-control-allow-origin" not in refused.headers
        assert "access-control-allow-methods" not in refused.headers
    assert upstream.requests == []


async def test_cors_preflight_configured_allow_headers(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"cors": {"allow_headers": ["X-One", "X-Two"]}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.options("/x", headers=preflight_headers())
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["access-control-allow-headers"] == "X-One, X-Two"
    assert r.headers["access-control-max-age"] == "600"
    assert "access-control-allow-credentials" not in r.headers
    assert upstream.requests == []


async def test_cors_actual_requests_with_origin_list(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {
        "key-auth": {},
        "cors": {
            "allow_origins": [ORIGIN, "https://two.example"],
            "allow_credentials": True,
            "expose_headers": ["X-Total", "X-Page"],
        },
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        key = await h.create_key()
        ok = await h.client.get("/x", headers={**bearer(key), "Origin": ORIGIN})
        err = await h.client.get("/x", headers={"Origin": "https://two.example"})
        other = await h.client.get("/x", headers={**bearer(key), "Origin": OTHER_ORIGIN})
        no_origin = await h.client.get("/x", headers=bearer(key))
    assert ok.status_code == 200
    assert ok.headers.get_list("access-control-allow-origin") == [ORIGIN]
    assert "Origin" in ok.headers.get_list("vary")
    assert ok.headers["access-control-allow-credentials"] == "true"
    assert ok.headers["access-control-expose-headers"] == "X-Total, X-Page"
    # errors carry CORS headers too, so a browser script can read them
    assert_problem(err, 401, "MISSING_KEY")
    assert err.headers["access-control-allow-origin"] == "https://two.example"
    assert "Origin" in err.headers.get_list("vary")
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-credentials" not in other.headers
    assert "access-control-allow-origin" not in no_origin.headers
    # the Origin header itself is forwarded
    assert [q.header("origin") for q in upstream.requests] == [ORIGIN, OTHER_ORIGIN, None]


async def test_cors_any_origin(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(
        tmp_path, global_plugins={"cors": {"allow_origins": ["*"]}}, upstream=upstream
    ) as h:
        r = await h.client.get("/x", headers={"Origin": OTHER_ORIGIN})
    assert r.status_code == 200
    assert r.headers.get_list("access-control-allow-origin") == ["*"]
    assert "access-control-allow-credentials" not in r.headers
    assert only_request(upstream).path == "/x"


async def test_cors_replaces_upstream_allow_origin(tmp_path: Path) -> None:
    """The gateway's CORS decision is the one the browser sees: an upstream's
    own Access-Control-Allow-Origin is replaced, not doubled (a doubled value
    is rejected by browsers)."""
    upstream = FakeUpstream([FakeResponse(200, [("access-control-allow-origin", "*")], b"ok")])
    plugins = {"cors": {"allow_origins": [ORIGIN]}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/x", headers={"Origin": ORIGIN})
    assert r.status_code == 200
    assert r.headers.get_list("access-control-allow-origin") == [ORIGIN]
    assert only_request(upstream).path == "/x"


async def test_cors_plain_options_reaches_upstream(tmp_path: Path) -> None:
    upstream = FakeUpstream([FakeResponse(200, [("allow", "GET, OPTIONS")], b"")])
    async with open_harness(tmp_path, plugins={"cors": {}}, upstream=upstream) as h:
        r = await h.client.options("/x")
        # Origin alone (no Access-Control-Request-Method) is not a preflight either
        r2 = await h.client.options("/y", headers={"Origin": ORIGIN})
    assert r.status_code == 200
    assert r.headers["allow"] == "GET, OPTIONS"
    assert r2.status_code == 200
    assert r2.headers["access-control-allow-origin"] == "*"
    assert [(q.method, q.path) for q in upstream.requests] == [("OPTIONS", "/x"), ("OPTIONS", "/y")]


CORS_CREDENTIALS_ANY: dict[str, dict[str, Any]] = {
    "cors": {"allow_origins": ["*"], "allow_credentials": True}
}


async def test_cors_credentials_with_any_origin_is_a_load_error(tmp_path: Path) -> None:
    lines = await start_fails(tmp_path, plugins=CORS_CREDENTIALS_ANY)
    assert any(
        line.startswith("routes[0].plugins.cors") and "'cors'" in line and "credentials" in line
        for line in lines
    ), lines


async def test_config_error_message_names_plugin_and_path(tmp_path: Path) -> None:
    """What a plugin author sees in a traceback when open_harness (or an
    embedded Server) refuses a config: the message itself must say which
    plugin and where, not only "config: 1 error(s)"."""
    message = str(await refused_config(tmp_path, plugins=CORS_CREDENTIALS_ANY))
    assert "routes[0].plugins.cors" in message, message
    assert "credentials" in message, message


# ---- ip-restriction -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        ({"deny": ["127.0.0.1/32"]}, False),
        ({"allow": ["10.0.0.0/8"]}, False),
        ({"allow": ["127.0.0.0/8"]}, True),
        ({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1"]}, False),
        ({"deny": ["10.0.0.0/8", "2001:db8::/32"]}, True),
        ({"allow": ["::1/128", "fd00::/8", "127.0.0.1/32"]}, True),
        ({"allow": ["::1/128"]}, False),
    ],
    ids=["deny-self", "allow-other", "allow-self", "deny-wins", "deny-other", "v6+v4", "v6-only"],
)
async def test_ip_restriction(tmp_path: Path, settings: dict[str, Any], allowed: bool) -> None:
    upstream = FakeUpstream()
    plugins = {"ip-restriction": settings, "key-auth": {}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        key = await h.create_key()
        r = await h.client.get("/x", headers=bearer(key))
        # it runs before key-auth: a refused client learns nothing about keys
        r_nokey = await h.client.get("/x")
    if allowed:
        assert r.status_code == 200, r.text
        assert only_request(upstream).header("x-forwarded-for") == "127.0.0.1"
        assert_problem(r_nokey, 401, "MISSING_KEY")
    else:
        assert_problem(r, 403, "FORBIDDEN")
        assert_problem(r_nokey, 403, "FORBIDDEN")
        assert upstream.requests == []


async def test_ip_restriction_ignores_forwarded_for(tmp_path: Path) -> None:
    """The TCP peer decides, not a header the client can write."""
    upstream = FakeUpstream()
    plugins = {"ip-restriction": {"allow": ["10.0.0.0/8"], "deny": ["192.0.2.0/24"]}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        spoofed = await h.client.get("/x", headers={"X-Forwarded-For": "10.1.2.3"})
        real_ip = await h.client.get("/x", headers={"X-Real-IP": "10.1.2.3"})
    assert_problem(spoofed, 403, "FORBIDDEN")
    assert_problem(real_ip, 403, "FORBIDDEN")
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"allow": ["10.0.0.300/8"]}, "10.0.0.300/8"),
        ({"deny": ["not-an-ip"]}, "not-an-ip"),
        ({}, "allow or deny"),
        ({"allow": [], "deny": []}, "allow or deny"),
    ],
    ids=["bad-allow", "bad-deny", "empty", "both-empty"],
)
async def test_ip_restriction_load_errors(
    tmp_path: Path, settings: dict[str, Any], fragment: str
) -> None:
    lines = await start_fails(tmp_path, plugins={"ip-restriction": settings})
    assert any(
        line.startswith("routes[0].plugins.ip-restriction")
        and "'ip-restriction'" in line
        and fragment in line
        for line in lines
    ), lines


# ---- request-size-limiting ----------------------------------------------------------


async def test_request_size_content_length(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"request-size-limiting": {"allowed_payload_bytes": 100}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        over = await h.client.post("/x", content=b"a" * 101)
        at_cap = await h.client.post("/x", content=b"b" * 100)
        empty = await h.client.post("/x", content=b"")
    assert_problem(over, 413, "PAYLOAD_TOO_LARGE")
    assert at_cap.status_code == 200
    assert empty.status_code == 200
    first, second = upstream.requests
    assert first.body == b"b" * 100
    assert first.header("content-length") == "100"
    assert second.body == b""


async def test_request_size_chunked(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"request-size-limiting": {"allowed_payload_bytes": 100}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        small = await h.client.post("/small", content=chunks([b"x" * 40, b"y" * 60]))
        assert small.status_code == 200, small.text
        try:
            r = await h.client.post("/big", content=chunks([b"z" * 50] * 10, pause=0.01))
        except httpx.TransportError:
            pass  # the gateway may cut the connection instead of answering 413
        else:
            assert_problem(r, 413, "PAYLOAD_TOO_LARGE")
        await trio.sleep(0.2)
        # the connection is usable again afterwards (or a fresh one is made)
        after = await h.client.get("/after")
        assert after.status_code == 200
    assert [q.path for q in upstream.requests] == ["/small", "/after"]
    assert upstream.requests[0].body == b"x" * 40 + b"y" * 60


async def test_request_size_require_content_length(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {
        "request-size-limiting": {"allowed_payload_bytes": 100, "require_content_length": True}
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        chunked = await h.client.post("/x", content=chunks([b"x" * 10]))
        declared = await h.client.post("/y", content=b"x" * 10)
        no_body = await h.client.get("/z")
    assert_problem(chunked, 411, "LENGTH_REQUIRED")
    assert declared.status_code == 200
    assert no_body.status_code == 200
    assert [q.path for q in upstream.requests] == ["/y", "/z"]


# ---- request-transformer ------------------------------------------------------------


async def test_request_transformer_headers(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {
        "request-transformer": {
            "remove_headers": ["x-remove"],
            "rename_headers": {"x-old": "x-new"},
            "replace_headers": {"x-replace": "replaced", "x-replace-absent": "nope"},
            "add_headers": {"x-add": "added", "x-add-present": "nope"},
            "append_headers": {"x-add-present": "appended", "x-append": "one"},
        }
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get(
            "/x",
            headers=[
                ("X-Remove", "gone"),
                ("X-Old", "renamed-value"),
                ("X-Replace", "original"),
                ("X-Add-Present", "client"),
                ("X-Keep", "kept"),
            ],
        )
    assert r.status_code == 200
    req = only_request(upstream)
    assert values(req, "x-remove") == []
    assert values(req, "x-old") == []
    assert values(req, "x-new") == ["renamed-value"]
    assert values(req, "x-replace") == ["replaced"]
    assert values(req, "x-replace-absent") == []
    assert values(req, "x-add") == ["added"]
    assert values(req, "x-add-present") == ["client", "appended"]
    assert values(req, "x-append") == ["one"]
    assert values(req, "x-keep") == ["kept"]


async def test_request_transformer_query(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {
        "request-transformer": {
            "remove_query": ["drop"],
            "rename_query": {"old": "new"},
            "replace_query": {"rep": "R", "absent": "nope"},
            "add_query": {"a": "nope", "added": "yes"},
        }
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/x?a=1&drop=2&old=3&rep=4&keep=5")
    assert r.status_code == 200
    req = only_request(upstream)
    assert req.path == "/x"
    assert sorted(parse_qsl(req.query, keep_blank_values=True)) == sorted(
        [("a", "1"), ("new", "3"), ("rep", "R"), ("keep", "5"), ("added", "yes")]
    )


async def test_request_transformer_path_template(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"request-transformer": {"path": "/v2/accounts/{id}/profile"}}
    async with open_harness(
        tmp_path, path="/users/{id:int}", plugins=plugins, upstream=upstream
    ) as h:
        r = await h.client.get("/users/42?full=1")
        bad = await h.client.get("/users/abc")
    assert r.status_code == 200
    assert_problem(bad, 400, "INVALID_PATH_PARAMETER")
    req = only_request(upstream)
    assert req.target == "/v2/accounts/42/profile?full=1"


JSON_OPS: dict[str, Any] = {
    "remove_json": ["secret"],
    "rename_json": {"old": "new"},
    "add_json": {"added": {"nested": [1, 2]}, "keep": "nope"},
}
EDITED = {"keep": 1, "new": 2, "added": {"nested": [1, 2]}}


async def test_request_transformer_json_body(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"request-transformer": dict(JSON_OPS)}
    doc = {"keep": 1, "secret": "s3cr3t", "old": 2}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r1 = await h.client.post("/json", json=doc)
        r2 = await h.client.post(
            "/chunked",
            content=chunks([json.dumps(doc).encode()[:10], json.dumps(doc).encode()[10:]]),
            headers={"Content-Type": "application/vnd.api+json; charset=utf-8"},
        )
        text = json.dumps(doc).encode()
        r3 = await h.client.post("/text", content=text, headers={"Content-Type": "text/plain"})
    assert r1.status_code == r2.status_code == r3.status_code == 200
    first, second, third = upstream.requests
    for req in (first, second):
        assert json.loads(req.body) == EDITED
        assert b"s3cr3t" not in req.body
        assert req.header("content-length") == str(len(req.body))
        assert req.header("transfer-encoding") is None
    assert third.body == text
    assert third.header("content-length") == str(len(text))


async def test_request_transformer_json_errors(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"request-transformer": {**JSON_OPS, "max_body_bytes": 64}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        big = await h.client.post("/big", json={"pad": "x" * 100})
        big_chunked = await h.client.post(
            "/big-chunked",
            content=chunks([b'{"pad": "', b"x" * 100, b'"}']),
            headers={"Content-Type": "application/json"},
        )
        invalid = await h.client.post(
            "/invalid", content=b'{"a": ', headers={"Content-Type": "application/json"}
        )
        ok = await h.client.post("/ok", json={"old": 2})
    assert_problem(big, 413, "PAYLOAD_TOO_LARGE")
    assert_problem(big_chunked, 413, "PAYLOAD_TOO_LARGE")
    body = assert_problem(invalid, 400, "VALIDATION_ERROR")
    assert body["errors"] and {"path", "message"} <= set(body["errors"][0])
    assert ok.status_code == 200
    req = only_request(upstream)
    assert req.path == "/ok"
    assert json.loads(req.body) == {"new": 2, "added": {"nested": [1, 2]}, "keep": "nope"}


# ---- response-transformer -----------------------------------------------------------


async def test_response_transformer_headers(tmp_path: Path) -> None:
    upstream = FakeUpstream(
        [
            FakeResponse(
                201,
                [
                    ("x-remove", "gone"),
                    ("x-old", "v"),
                    ("x-replace", "original"),
                    ("x-add-present", "upstream"),
                    ("content-type", "text/plain"),
                ],
                b"hello",
            )
        ]
    )
    plugins = {
        "response-transformer": {
            "remove_headers": ["x-remove"],
            "rename_headers": {"x-old": "x-new"},
            "replace_headers": {"x-replace": "replaced", "x-absent": "nope"},
            "add_headers": {"x-add-present": "nope", "x-served-by": "triogate"},
            "append_headers": {"x-add-present": "appended"},
        }
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/x")
    assert r.status_code == 201
    assert r.content == b"hello"
    assert "x-remove" not in r.headers
    assert "x-old" not in r.headers
    assert r.headers["x-new"] == "v"
    assert r.headers.get_list("x-replace") == ["replaced"]
    assert "x-absent" not in r.headers
    assert r.headers.get_list("x-add-present") == ["upstream", "appended"]
    assert r.headers["x-served-by"] == "triogate"
    assert only_request(upstream).path == "/x"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_response_transformer_json_body(tmp_path: Path, chunked: bool) -> None:
    raw = json.dumps({"keep": 1, "secret": "s3cr3t", "old": 2}).encode()
    answer = FakeResponse(
        200,
        [("content-type", "application/json")],
        raw,
        chunks=[raw[:7], raw[7:20], raw[20:]] if chunked else None,
    )
    upstream = FakeUpstream([answer])
    plugins = {"response-transformer": dict(JSON_OPS)}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/x")
    assert r.status_code == 200
    assert r.json() == EDITED
    assert b"s3cr3t" not in r.content
    assert r.headers["content-length"] == str(len(r.content))
    assert "transfer-encoding" not in r.headers
    assert only_request(upstream).path == "/x"


async def test_response_transformer_non_json_untouched(tmp_path: Path) -> None:
    raw = json.dumps({"secret": "s3cr3t", "old": 2}).encode()
    upstream = FakeUpstream(
        [
            FakeResponse(200, [("content-type", "text/plain")], raw),
            FakeResponse(200, [("content-type", "text/plain")], chunks=[raw[:5], raw[5:]]),
            FakeResponse(200, [("content-type", "application/json")], b"not json {"),
        ]
    )
    plugins = {"response-transformer": dict(JSON_OPS)}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        plain = await h.client.get("/a")
        streamed = await h.client.get("/b")
        broken = await h.client.get("/c")
    assert plain.status_code == streamed.status_code == broken.status_code == 200
    assert plain.content == raw
    assert streamed.content == raw
    assert broken.content == b"not json {"
    assert len(upstream.requests) == 3


async def test_response_transformer_too_large_json_streamed(tmp_path: Path) -> None:
    raw = json.dumps({"pad": "x" * 200}).encode()
    upstream = FakeUpstream(
        [FakeResponse(200, [("content-type", "application/json")], chunks=[raw[:50], raw[50:]])]
    )
    plugins = {"response-transformer": {**JSON_OPS, "max_body_bytes": 64}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/streamed")
    assert_problem(r, 502, "BAD_GATEWAY")
    assert only_request(upstream).path == "/streamed"


async def test_response_transformer_too_large_json_in_one_read(tmp_path: Path) -> None:
    """The cap holds also when the whole (small) response arrives in the same
    read as its head."""
    raw = json.dumps({"pad": "x" * 200, "old": 1}).encode()
    upstream = FakeUpstream(
        [FakeResponse(200, [("content-type", "application/json")], raw)], single_write=True
    )
    plugins = {"response-transformer": {**JSON_OPS, "max_body_bytes": 64}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/whole")
    assert_problem(r, 502, "BAD_GATEWAY")
    assert only_request(upstream).path == "/whole"


async def test_response_transformer_large_non_json_streams(tmp_path: Path) -> None:
    """Only JSON bodies are buffered for JSON edits: a non-JSON response
    larger than max_body_bytes passes through untouched."""
    payload = b"0123456789" * 50
    upstream = FakeUpstream(
        [
            FakeResponse(
                200,
                [("content-type", "application/octet-stream")],
                chunks=[payload[:100], payload[100:]],
            )
        ]
    )
    plugins = {"response-transformer": {**JSON_OPS, "max_body_bytes": 64}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        r = await h.client.get("/download")
    assert r.status_code == 200, r.text
    assert r.content == payload
    assert only_request(upstream).path == "/download"


async def test_response_transformer_leaves_gateway_errors_whole(tmp_path: Path) -> None:
    """JSON edits are for upstream bodies: the gateway's own problem+json
    errors keep the members CONTRACT section 4 promises (code, status,
    request_id, ...), whatever the route's response-transformer removes."""
    upstream = FakeUpstream(
        [FakeResponse.json({"code": "upstream-code", "status": "fine", "request_id": "u"})]
    )
    plugins: dict[str, dict[str, Any]] = {
        "key-auth": {},
        "response-transformer": {
            "remove_json": ["code", "request_id"],
            "rename_json": {"status": "http_status"},
            "add_json": {"injected": True},
            "add_headers": {"x-served-by": "triogate"},
        },
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        key = await h.create_key()
        err = await h.client.get("/x")
        ok = await h.client.get("/y", headers=bearer(key))
    body = assert_problem(err, 401, "MISSING_KEY")
    assert "injected" not in body
    # the upstream's JSON is edited as configured
    assert ok.status_code == 200
    assert ok.json() == {"http_status": "fine", "injected": True}
    assert ok.headers["x-served-by"] == "triogate"
    assert only_request(upstream).path == "/y"


# ---- ordering and merging -----------------------------------------------------------


async def test_global_and_route_plugins_merge(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(
        tmp_path,
        global_plugins={
            "request-id": {},
            "request-transformer": {"add_headers": {"x-from": "global", "x-global": "1"}},
        },
        plugins={"request-transformer": {"add_headers": {"x-from": "route"}}},
        upstream=upstream,
    ) as h:
        r = await h.client.get("/x")
        admin = await setup_admin(h)
        routes = await h.admin.get("/routes", headers=admin)
    assert r.status_code == 200
    req = only_request(upstream)
    assert values(req, "x-from") == ["route"]
    assert values(req, "x-global") == []  # the route's table replaces the global one whole
    assert r.headers["x-request-id"] == req.header("x-request-id")
    assert routes.status_code == 200, routes.text
    names = [p["name"] for p in routes.json()["items"][0]["plugins"]]
    assert names == ["request-id", "request-transformer"]


async def test_get_routes_lists_each_route_and_its_chain(tmp_path: Path) -> None:
    """GET /routes, the whole document and its field order: the data plane's
    typed records encoded as they are."""
    routes = [
        {
            "name": "users",
            "path": "/users/{id}",
            "methods": ["GET", "HEAD"],
            "upstream": "test",
            "upstream_path": "/v2/users/{id}",
            "version": "1",
            "plugins": {"key-auth": {}, "cors": {}},
        },
        {"name": "rest", "path": "/{rest:path}", "upstream": "test"},
    ]
    async with open_harness(
        tmp_path, routes=routes, global_plugins={"request-id": {}}, api_versions={"1": {}}
    ) as h:
        admin = await setup_admin(h)
        r = await h.admin.get("/routes", headers=admin)
    assert r.status_code == 200, r.text
    request_id = {"name": "request-id", "priority": 100000, "phases": ["response"]}
    assert r.json() == {
        "items": [
            {
                "name": "users",
                "methods": ["GET", "HEAD"],
                "path": "/users/{id}",
                "version": "1",
                "upstream": "test",
                "upstream_path": "/v2/users/{id}",
                "plugins": [
                    request_id,  # the global table merged in
                    {"name": "cors", "priority": 2000, "phases": ["access", "response"]},
                    {"name": "key-auth", "priority": 1250, "phases": ["access", "log"]},
                ],
            },
            {
                "name": "rest",
                "methods": ["*"],
                "path": "/{rest:path}",
                "version": None,
                "upstream": "test",
                "upstream_path": None,
                "plugins": [request_id],
            },
        ]
    }
    keys = ["name", "methods", "path", "version", "upstream", "upstream_path", "plugins"]
    assert [list(item) for item in r.json()["items"]] == [keys, keys]
    assert [list(p) for p in r.json()["items"][1]["plugins"]] == [["name", "priority", "phases"]]


async def route_plugin_names(h: Harness) -> list[str]:
    admin = await setup_admin(h)
    r = await h.admin.get("/routes", headers=admin)
    assert r.status_code == 200, r.text
    return [p["name"] for p in r.json()["items"][0]["plugins"]]


async def test_default_priority_order(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins: dict[str, dict[str, Any]] = {
        "response-transformer": {},
        "request-transformer": {"add_headers": {"x-api-key": "ignored"}},
        "key-auth": {},
        "cors": {},
        "request-size-limiting": {"allowed_payload_bytes": 10},
        "ip-restriction": {"allow": ["127.0.0.0/8"]},
    }
    async with open_harness(
        tmp_path, plugins=plugins, global_plugins={"request-id": {}}, upstream=upstream
    ) as h:
        names = await route_plugin_names(h)
        r = await h.client.get("/x")
    assert names == [
        "request-id",
        "ip-restriction",
        "cors",
        "request-size-limiting",
        "key-auth",
        "request-transformer",
        "response-transformer",
    ]
    # the transformer's x-api-key comes after key-auth has refused the request
    assert_problem(r, 401, "MISSING_KEY")
    assert upstream.requests == []


async def test_before_constraint_moves_transformer_ahead_of_key_auth(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(tmp_path, upstream=upstream) as h:
        key, key_id = await key_with_id(h)
    # a second gateway over the same data dir, whose route injects the key
    upstream = FakeUpstream()
    plugins = {
        "key-auth": {},
        "request-transformer": {"add_headers": {"x-api-key": key}, "before": ["key-auth"]},
    }
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        names = await route_plugin_names(h)
        r = await h.client.get("/x")
    assert names == ["request-transformer", "key-auth"]
    assert r.status_code == 200, r.text
    req = only_request(upstream)
    assert req.header("x-api-key") is None  # injected, then hidden by key-auth
    assert values(req, "x-key-id") == [key_id]


async def test_after_constraint_moves_cors_behind_key_auth(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    plugins = {"key-auth": {}, "cors": {"after": ["key-auth"]}}
    async with open_harness(tmp_path, plugins=plugins, upstream=upstream) as h:
        names = await route_plugin_names(h)
        r = await h.client.options("/x", headers=preflight_headers())
    assert names == ["key-auth", "cors"]
    # the preflight now needs a key: key-auth refuses it before CORS answers
    assert_problem(r, 401, "MISSING_KEY")
    assert r.headers["access-control-allow-origin"] == "*"
    assert upstream.requests == []


async def test_global_before_constraint(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    async with open_harness(
        tmp_path,
        global_plugins={"request-transformer": {"before": ["ip-restriction"]}},
        plugins={"ip-restriction": {"allow": ["127.0.0.0/8"]}},
        upstream=upstream,
    ) as h:
        names = await route_plugin_names(h)
        r = await h.client.get("/x")
    assert names == ["request-transformer", "ip-restriction"]
    assert r.status_code == 200
    assert only_request(upstream).path == "/x"


@pytest.mark.parametrize(
    ("kw", "path"),
    [
        ({"plugins": {"no-such-plugin": {}}}, "routes[0].plugins.no-such-plugin"),
        ({"global_plugins": {"no-such-plugin": {}}}, "plugins.no-such-plugin"),
        (
            {"plugins": {"key-auth": {"before": ["no-such-plugin"]}}},
            "routes[0].plugins.key-auth",
        ),
        ({"plugins": {"key-auth": {"scopes": "users:read"}}}, "routes[0].plugins.key-auth.scopes"),
        ({"plugins": {"cors": {"allow_origin": ["*"]}}}, "routes[0].plugins.cors"),
        (
            {"plugins": {"key-auth": {"before": ["cors"]}, "cors": {"before": ["key-auth"]}}},
            "routes[0]",
        ),
    ],
    ids=["unknown-route", "unknown-global", "unknown-before", "bad-type", "unknown-field", "cycle"],
)
async def test_plugin_config_errors_stop_start_up(
    tmp_path: Path, kw: dict[str, Any], path: str
) -> None:
    lines = await start_fails(tmp_path, **kw)
    assert any(line.startswith(path) for line in lines), lines
    if "no-such-plugin" in repr(kw):
        assert any("no-such-plugin" in line for line in lines), lines
