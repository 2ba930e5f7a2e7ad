"""HTTP conformance of the answers the gateway makes itself, through the real
server: 401s carry a ``WWW-Authenticate`` challenge (RFC 9110 11.6.1, RFC
6750 3), admin answers carry ``Date``, the admin listener closes a
``Connection: close`` exchange right after the answer, ``POST /setup`` after
setup is refused before its body is looked at, and error lists are capped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import Admin, Running, make_config
from triogate.control.audit import Actor
from triogate.errors import FieldError, ValidationError
from triogate.runtime.server import Server
from triogate.testing import FakeUpstream, Harness, open_harness

ADMIN_CHALLENGE = 'Bearer realm="triogate-admin"'
PROXY_CHALLENGE = 'Bearer realm="triogate"'
INVALID = ', error="invalid_token"'
# Bounds on waits (not timings): the idle timeout is an hour, so a listener
# that only closes at the idle timeout fails these by a wide margin.
WAIT_SECONDS = 20
IDLE = 3600


# ---- WWW-Authenticate -----------------------------------------------------------


async def test_admin_401s_carry_a_challenge(running: Running, root: Admin) -> None:
    r = await running.client.get("/keys")
    assert (r.status_code, r.json()["code"]) == (401, "MISSING_KEY")
    assert r.headers["www-authenticate"] == ADMIN_CHALLENGE
    r = await running.client.get("/keys", headers={"Authorization": "Bearer tgadm_nope"})
    assert (r.status_code, r.json()["code"]) == (401, "INVALID_KEY")
    assert r.headers["www-authenticate"] == ADMIN_CHALLENGE + INVALID
    # Not on answers that are not 401s.
    r = await running.client.get("/keys", headers=root.headers)
    assert r.status_code == 200 and "www-authenticate" not in r.headers


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, upstream=FakeUpstream(), plugins={"key-auth": {}}) as h:
        yield h


async def test_key_auth_401s_carry_a_challenge(h: Harness) -> None:
    r = await h.client.get("/x")
    assert (r.status_code, r.json()["code"]) == (401, "MISSING_KEY")
    assert r.headers["www-authenticate"] == PROXY_CHALLENGE
    r = await h.client.get("/x", headers={"Authorization": "Bearer tg_nope"})
    assert (r.status_code, r.json()["code"]) == (401, "INVALID_KEY")
    assert r.headers["www-authenticate"] == PROXY_CHALLENGE + INVALID

    key = await h.create_key()
    assert h.server.gateway is not None
    record = h.server.gateway.keys.validate_nowait(key, ())[0]
    assert record is not None
    await h.server.gateway.keys.revoke(record.id, Actor("test"))
    r = await h.client.get("/x", headers={"Authorization": f"Bearer {key}"})
    assert (r.status_code, r.json()["code"]) == (401, "KEY_REVOKED")
    assert r.headers["www-authenticate"] == PROXY_CHALLENGE + INVALID
    assert h.upstream.requests == []


# ---- Date, reason phrase ---------------------------------------------------------


async def _raw_exchange(url: str, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` on a fresh connection and read until the server
    closes it (True) or ``WAIT_SECONDS`` pass (False)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    data = b""
    closed = False
    async with stream:
        await stream.send_all(request)
        with trio.move_on_after(WAIT_SECONDS):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
    return data, closed


@pytest.fixture
async def idle_server(tmp_path: Path) -> AsyncIterator[str]:
    server = Server(make_config(tmp_path / "data", idle_timeout_seconds=IDLE))
    async with trio.open_nursery() as nursery:
        info = await nursery.start(server.run)
        yield info.admin_url
        server.shutdown()


async def test_admin_closes_right_after_a_connection_close_answer(idle_server: str) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data, closed = await _raw_exchange(idle_server, head)
    assert closed, f"the admin listener kept the connection open: {data!r}"
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", status_line  # reason phrase filled in
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(b":") for line in rest.split(b"\r\n\r\n")[0].split(b"\r\n"))
    }
    assert headers[b"connection"].lower() == b"close"
    assert headers[b"date"].endswith(b" GMT")
    assert b'"status":"ok"' in rest


async def test_admin_keeps_alive_otherwise(idle_server: str) -> None:
    """Two requests on one connection, then the connection is still open."""
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    host, port = idle_server.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        for _ in range(2):
            await stream.send_all(one)
            data = b""
            with trio.fail_after(WAIT_SECONDS):
                while b'"status":"ok"' not in data:
                    chunk = await stream.receive_some(65536)
                    assert chunk, "closed a keep-alive connection"
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")


async def test_admin_answers_carry_date(running: Running) -> None:
    for r in (
        await running.client.get("/health"),
        await running.client.get("/keys"),  # a problem answer too
        await running.client.get("/nowhere"),
    ):
        assert r.headers["date"].endswith(" GMT"), r.headers


# ---- /setup, error lists ---------------------------------------------------------


def _many_fields(n: int) -> dict[str, Any]:
    return {"name": "root", "email": "root@example.com", **{f"f{i:06d}": i for i in range(n)}}


async def test_setup_after_setup_is_409_whatever_the_body(running: Running, root: Admin) -> None:
    big = _many_fields(60_000)  # about a megabyte of unknown fields
    r = await running.client.post("/setup", json=big)
    assert (r.status_code, r.json()["code"]) == (409, "CONFLICT"), r.text[:300]
    assert "errors" not in r.json()
    r = await running.client.post("/setup", content=b"not even json")
    assert (r.status_code, r.json()["code"]) == (409, "CONFLICT")
    # The connection is still good for the next request.
    assert (await running.client.get("/health")).status_code == 200


async def test_an_unauthenticated_error_list_is_capped(running: Running) -> None:
    r = await running.client.post("/setup", json=_many_fields(5000))
    assert (r.status_code, r.json()["code"]) == (400, "VALIDATION_ERROR")
    errors = r.json()["errors"]
    cap = ValidationError.MAX_ERRORS
    assert len(errors) == cap + 1
    assert errors[:cap] == [{"path": f"f{i:06d}", "message": "unknown field"} for i in range(cap)]
    assert errors[-1]["path"] == "$" and "cut" in errors[-1]["message"]
    # Below the cap, every error is listed and nothing says "cut".
    r = await running.client.post("/setup", json=_many_fields(3))
    assert [e["path"] for e in r.json()["errors"]] == ["f000000", "f000001", "f000002"]


async def test_an_admin_error_list_is_capped_too(running: Running, root: Admin) -> None:
    body = {"name": "n", "owner": "o", **{f"x{i}": 1 for i in range(1000)}}
    r = await running.client.post("/keys", headers=root.headers, json=body)
    assert r.status_code == 400
    assert len(r.json()["errors"]) == ValidationError.MAX_ERRORS + 1


def test_validation_error_caps_its_list() -> None:
    exc = ValidationError([FieldError(f"p{i}", "bad") for i in range(10_000)])
    assert len(exc.errors) == ValidationError.MAX_ERRORS + 1
    assert len(exc.problem()["errors"]) == ValidationError.MAX_ERRORS + 1


async def test_the_proxy_problem_is_unchanged_by_the_admin_realm(h: Harness) -> None:
    """The admin app rewrites the realm of the errors it answers; the same
    classes raised on the data plane keep the proxy's."""
    r = await h.admin.get("/keys")
    assert r.headers["www-authenticate"] == ADMIN_CHALLENGE
    r = await h.client.get("/x")
    assert r.headers["www-authenticate"] == PROXY_CHALLENGE


async def test_admin_errors_carry_their_reason_phrase(idle_server: str) -> None:
    head = b"GET /keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data, _ = await _raw_exchange(idle_server, head)
    assert data.partition(b"\r\n")[0] == b"HTTP/1.1 401 Unauthorized", data[:200]
