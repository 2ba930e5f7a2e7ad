"""Holes an attack pass found in the native proxy listener, each closed:

* a dual-stack ``[::]`` listener saw IPv4 clients as ``::ffff:127.0.0.1``
  (ip-restriction rules for IPv4 stopped matching, X-Forwarded-For carried
  the mapped form);
* no connection cap: idle connections exhausted the descriptors and both
  listeners stopped answering;
* the body timeout was per read: a client dripping a byte at a time held an
  upstream connection for as long as it liked;
* a request line without a version (HTTP/0.9) was forwarded as HTTP/1.1;
* requests the listener refused by itself left no access-log line;
* the gateway's own answers carried no ``Date``.

Real gateway in-process (real LMDB, real loopback sockets) or the real
``triogate serve`` executable; nothing here asserts a duration.
"""

from __future__ import annotations

import email.utils
import json
import resource
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
import trio

from tests.helpers_process import ServeProcess, clean_env, triogate_command, write_config
from tests.test_listener import (
    Wire,
    WireResponse,
    echoed,
    gateway,
    get,
    nothing_upstream,
    proxy_port,
    wire,
)
from triogate.config import LogConfig, load_config
from triogate.control.audit import Actor
from triogate.dataplane.listener import connection_cap
from triogate.http.h1write import http_date
from triogate.http.netaddr import client_ip
from triogate.runtime.server import Server
from triogate.testing import FakeResponse, FakeUpstream, harness_config, open_harness

PROBLEM_JSON: Final = "application/problem+json"


# ---- helpers ------------------------------------------------------------------------


@asynccontextmanager
async def wire_to(host: str, port: int) -> AsyncIterator[Wire]:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        yield Wire(stream)


async def wait_for(done: Any, what: str, *, within: float = 5.0) -> None:
    """Poll ``done()`` (bounded): for state another task changes."""
    with trio.move_on_after(within):
        for _ in range(int(within / 0.01) + 1):
            if done():
                return
            await trio.sleep(0.01)
    raise AssertionError(f"not within {within} s: {what}")


async def idle_connections(port: int, count: int) -> list[trio.SocketStream]:
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]


# ---- 1. IPv4 clients on a dual-stack listener -------------------------------------------


def test_mapped_addresses_are_unmapped() -> None:
    assert client_ip("::ffff:127.0.0.1") == "127.0.0.1"
    assert client_ip("::FFFF:10.1.2.3") == "10.1.2.3"
    assert client_ip("::ffff:7f00:1") == "127.0.0.1"  # the same address, hex-written
    for unchanged in ("127.0.0.1", "::1", "2001:db8::1", "fe80::1%eth0", "::ffff:nonsense"):
        assert client_ip(unchanged) == unchanged


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_ipv4_client_of_a_dual_stack_listener_is_seen_as_ipv4(tmp_path: Path) -> None:
    assert ipv6_loopback_works(), "this test needs IPv6 loopback"
    server = {"proxy_listen": "[::]:0"}
    async with gateway(tmp_path, server=server) as h:
        assert h.info.proxy_url.startswith("http://[::]:"), h.info.proxy_url
        port = proxy_port(h)
        async with wire_to("127.0.0.1", port) as w:  # IPv4, to the [::] socket
            await w.send(get("/v4"))
            headers = echoed(await w.response())["headers"]
        assert headers["x-forwarded-for"] == "127.0.0.1"
        async with wire_to("::1", port) as w:  # and IPv6 still itself
            await w.send(get("/v6"))
            headers = echoed(await w.response())["headers"]
        assert headers["x-forwarded-for"] == "::1"


async def test_ipv4_deny_rule_holds_on_a_dual_stack_listener(tmp_path: Path) -> None:
    server = {"proxy_listen": "[::]:0"}
    plugins = {"ip-restriction": {"deny": ["127.0.0.0/8"]}}
    async with gateway(tmp_path, server=server, plugins=plugins) as h:
        async with wire_to("127.0.0.1", proxy_port(h)) as w:
            await w.send(get("/private"))
            r = await w.response()
        assert r.status == 403
        assert r.code == "FORBIDDEN"
        nothing_upstream(h)


# ---- 2. the connection cap ------------------------------------------------------------


def test_the_cap_keeps_a_descriptor_reserve() -> None:
    assert connection_cap(10_000, 1_048_576) == 10_000
    # 10% (at least 64) kept back; each connection may hold an upstream one.
    assert connection_cap(10_000, 1024) == (1024 - 102) // 2
    assert connection_cap(10_000, 256) == (256 - 64) // 2
    assert connection_cap(5, 256) == 5
    assert connection_cap(10_000, 64) == 1  # never zero
    assert connection_cap(10_000, resource.RLIM_INFINITY) == 10_000


async def test_connections_over_max_connections_get_503_and_close(tmp_path: Path) -> None:
    async with gateway(tmp_path, server={"max_connections": 5}) as h:
        proxy = h.server.proxy
        assert proxy is not None and proxy.cap == 5
        port = proxy_port(h)
        idle = await idle_connections(port, 5)
        await wait_for(lambda: len(proxy.connections) == 5, "five connections served")
        async with wire_to("127.0.0.1", port) as w:
            await w.send(get("/sixth"))
            r = await w.response()
            assert r.status == 503
            assert r.code == "TOO_MANY_CONNECTIONS"
            assert r.header("connection") == "close"
            assert r.header("date") is not None
            assert await w.closed()
        assert proxy.refused == 1
        # One idle connection goes: there is room again.
        await idle.pop().aclose()
        await wait_for(lambda: len(proxy.connections) == 4, "the closed one is gone")
        async with wire_to("127.0.0.1", port) as w:
            await w.send(get("/room-again"))
            assert echoed(await w.response())["target"] == "/room-again"
        for stream in idle:
            await stream.aclose()
        assert [r.target for r in h.upstream.requests] == ["/room-again"]


async def test_a_reload_applies_a_new_max_connections(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    path = tmp_path / "triogate.toml"

    def write(max_connections: int) -> None:
        path.write_text(
            f"""
[server]
proxy_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
shutdown_grace_seconds = 1
max_connections = {max_connections}

[upstreams.test]
targets = ["{upstream.url}"]

[[routes]]
name = "test"
path = "/{{rest:path}}"
upstream = "test"
"""
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        write(2)
        server = Server(load_config(path), source=str(path))
        info = await nursery.start(server.run)
        proxy = server.proxy
        assert proxy is not None and proxy.cap == 2
        port = int(info.proxy_url.rsplit(":", 1)[1])
        idle = await idle_connections(port, 2)
        await wait_for(lambda: len(proxy.connections) == 2, "two connections served")
        async with wire_to("127.0.0.1", port) as w:
            await w.send(get("/third"))
            assert (await w.response()).status == 503

        write(3)
        assert server.gateway is not None
        await server.gateway.configs.reload(Actor("test"))
        assert proxy.cap == 3
        async with wire_to("127.0.0.1", port) as w:
            await w.send(get("/third-after-reload"))
            assert echoed(await w.response())["target"] == "/third-after-reload"
        for stream in idle:
            await stream.aclose()
        server.shutdown()
        with trio.fail_after(10):
            await server.stopped.wait()
        nursery.cancel_scope.cancel()


def _low_fd_limit() -> None:  # runs in the child, before exec
    # A soft limit below the hard one: the gateway raises it to 256 at start.
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 256))


@contextmanager
def serve_with_256_fds(tmp_path: Path) -> Iterator[ServeProcess]:
    config = write_config(tmp_path / "triogate.toml", tmp_path / "data")
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*triogate_command(), "serve", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
            preexec_fn=_low_fd_limit,
        )
    sp = ServeProcess(proc, stderr_path)
    try:
        sp.wait_ready()
        yield sp
    finally:
        sp.stop()


def _proxy_port(sp: ServeProcess) -> int:
    for line in sp.stdout_lines:
        if line.startswith("triogate: proxy listening on "):
            return int(line.rsplit(":", 1)[1])
    raise AssertionError(f"no proxy line in {sp.stdout_lines}")


def _status(port: int) -> int | None:
    """The status of one GET on a new proxy connection (None: closed unanswered)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(get("/probe"))
            data = b""
            while b"\r\n\r\n" not in data:
                piece = s.recv(65536)
                if not piece:
                    break
                data += piece
    except OSError:
        return None
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


def test_idle_connections_cannot_take_every_descriptor(tmp_path: Path) -> None:
    """300 idle connections against a 256-descriptor limit (raised from a
    soft 200 at start): new proxy
    connections are answered 503, the admin listener's /health answers, and
    once the idle connections go, the proxy answers again."""
    with serve_with_256_fds(tmp_path) as sp:
        port = _proxy_port(sp)
        idle: list[socket.socket] = []
        try:
            for _ in range(300):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            statuses: list[int | None] = []
            for _ in range(50):  # refusals in progress end within a second
                statuses.append(_status(port))
                if statuses[-1] == 503:
                    break
                time.sleep(0.1)
            assert statuses[-1] == 503, statuses
            with sp.client() as admin:
                health = admin.get("/health")
            assert health.status_code == 200, health.text
        finally:
            for s in idle:
                s.close()
        after: list[int | None] = []
        for _ in range(100):
            after.append(_status(port))
            if after[-1] not in (503, None):
                break
            time.sleep(0.05)
        assert after[-1] == 404, after  # no routes configured: the gateway's own 404
    log = sp.stderr()
    assert "file-descriptor limit raised from 200 to 256" in log, log[-2000:]
    assert "max_connections 10000 lowered to 96" in log, log[-2000:]
    assert "EMFILE" not in log and "Too many open files" not in log, log[-2000:]


# ---- 3. the whole-body deadline ---------------------------------------------------------


async def drip_until_answered(w: Wire, length: int) -> tuple[WireResponse, int]:
    """Drip a declared body a byte every 0.3 s until the gateway answers;
    the answer and how many bytes went out before it."""
    sent = 0
    async with trio.open_nursery() as nursery:

        async def drip() -> None:
            nonlocal sent
            for _ in range(length):
                if not await w.try_send(b"x"):
                    return
                sent += 1
                await trio.sleep(0.3)

        nursery.start_soon(drip)
        r = await w.response("POST", within=20)
        nursery.cancel_scope.cancel()
    return r, sent


async def test_a_dripped_body_is_cut_off_by_the_body_deadline(tmp_path: Path) -> None:
    server = {"body_timeout_seconds": 1, "body_deadline_seconds": 1.5}
    async with gateway(tmp_path, server=server) as h, wire(h) as w:
        length = 40  # dripped at 0.3 s a byte: 12 s, far past the deadline
        await w.send(b"POST /drip HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % length)
        r, sent = await drip_until_answered(w, length)
        assert r.status == 408
        assert r.code == "REQUEST_TIMEOUT"
        assert "body_deadline_seconds" in r.json()["detail"]
        assert sent < length, "the whole body went through: no deadline"
        assert await w.closed()
        # The upstream had the request's head and part of its body, never all
        # of it; its connection was dropped, not handed back to the pool.
        assert h.upstream.connections == 1
        assert h.upstream.requests == []
        pipeline = h.server.gateway.current_pipeline() if h.server.gateway else None
        assert pipeline is not None
        stats = pipeline.upstreams["test"].statistics().targets[0]
        assert stats.active == 0 and stats.idle == 0, stats


async def test_a_dripped_body_after_an_early_answer_is_cut_off(tmp_path: Path) -> None:
    """An early refusal (403 here) drains a small body to keep the
    connection; a drip cannot make that drain last past the deadline."""
    server = {"body_timeout_seconds": 1, "body_deadline_seconds": 1.5}
    plugins = {"ip-restriction": {"deny": ["127.0.0.0/8"]}}
    async with gateway(tmp_path, server=server, plugins=plugins) as h, wire(h) as w:
        length = 40
        await w.send(b"POST /drip HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % length)
        r, sent = await drip_until_answered(w, length)
        assert r.status == 403
        assert r.header("connection") == "close"
        assert sent < length
        assert await w.closed()
        nothing_upstream(h)


# ---- 4. HTTP/0.9 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"GET /nine\r\n\r\n", b"GET /nine\r\nHost: a\r\n\r\n", b"GET /nine HTTP/0.9\r\n\r\n"],
    ids=["bare", "with-headers", "explicit"],
)
async def test_a_request_line_without_a_version_is_refused(tmp_path: Path, line: bytes) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(line)
        r = await w.response()
        assert r.status == 400
        assert r.code == "BAD_REQUEST"
        assert await w.closed()
        nothing_upstream(h)


# ---- 5. refused requests are in the access log -------------------------------------------


async def test_requests_the_listener_refuses_have_access_log_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    upstream = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        config = harness_config(
            tmp_path / "data",
            upstream.url,
            server={
                "max_header_bytes": 4096,
                "max_request_body_bytes": 1000,
                "header_timeout_seconds": 0.5,
            },
        )
        config = msgspec.structs.replace(config, log=LogConfig(access_log=str(path)))
        async with open_harness(tmp_path, upstream=upstream, config=config) as h:
            port = proxy_port(h)
            probes = [
                (b"NOT HTTP AT ALL\r\n\r\n", 400),
                (b"GET /nine\r\n\r\n", 400),
                (b"GET /big-head HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
                (b"POST /big-body HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n", 413),
                (b"GET /slow-head HTTP/1.1\r\nHost: a\r\n", 408),
            ]
            for data, status in probes:
                async with wire_to("127.0.0.1", port) as w:
                    await w.send(data)
                    assert (await w.response(within=5)).status == status
        nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    got = [(line["status"], line["outcome"], line["client_ip"]) for line in lines]
    assert got == [
        (400, "BAD_REQUEST", "127.0.0.1"),
        (400, "BAD_REQUEST", "127.0.0.1"),
        (431, "HEADERS_TOO_LARGE", "127.0.0.1"),
        (413, "PAYLOAD_TOO_LARGE", "127.0.0.1"),
        (408, "REQUEST_TIMEOUT", "127.0.0.1"),
    ], got
    assert lines[3]["method"] == "POST" and lines[3]["path"].startswith("/big-body")


# ---- 6. Date --------------------------------------------------------------------------


def _parse_date(value: str | None) -> float:
    assert value is not None, "no Date header"
    parsed = email.utils.parsedate_to_datetime(value)
    assert value.endswith(" GMT")
    return parsed.timestamp()


def test_the_date_line_is_an_imf_fixdate() -> None:
    line = http_date()
    assert line.startswith(b"date: ") and line.endswith(b" GMT\r\n")
    assert abs(_parse_date(line[6:-2].decode()) - time.time()) < 5


async def test_the_gateways_own_answers_carry_a_date(tmp_path: Path) -> None:
    answers = [
        FakeResponse(200, [("date", "Mon, 01 Jan 2001 00:00:00 GMT")], b"dated"),
        FakeResponse(200, [], b"undated"),
    ]
    async with gateway(tmp_path, FakeUpstream(answers)) as h, wire(h) as w:
        await w.send(get("/dated"))
        r = await w.response()
        # The upstream's own Date passes through untouched, and alone.
        assert [v for k, v in r.headers if k == "date"] == ["Mon, 01 Jan 2001 00:00:00 GMT"]
        await w.send(get("/undated"))
        r = await w.response()
        assert abs(_parse_date(r.header("date")) - time.time()) < 5
        await w.send(get("/bad/../path"))  # refused by the gateway: problem+json
        r = await w.response()
        assert r.status == 400
        assert abs(_parse_date(r.header("date")) - time.time()) < 5


async def test_a_pipeline_answer_carries_a_date(tmp_path: Path) -> None:
    async with open_harness(tmp_path, plugins={"key-auth": {}}) as h:
        r = await h.client.get("/needs-a-key")
        assert r.status_code == 401
        assert abs(_parse_date(r.headers.get("date")) - time.time()) < 5
