"""WebSocket proxying end to end (docs/websockets.md): a real WebSocket client
(wsproto over a trio socket) through the real gateway (native listener, real
LMDB in a temp dir) to a real WebSocket echo server (wsproto over trio) on
127.0.0.1. ``test_websocket_process.py`` does the same through the
``triogate serve`` executable.

Waits are bounded (``WAIT`` seconds, loops by count); nothing asserts a
duration."""

from __future__ import annotations

import base64
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from triogate.config import LogConfig
from triogate.testing import Harness, LoopbackServer, harness_config, open_harness

WAIT = 10.0
READS = 200  # bound on every read loop


# ---- the peers ----------------------------------------------------------------------------------


class EchoServer(LoopbackServer):
    """A WebSocket echo server. ``reject``: answers the handshake 403 with a
    body instead. A text message ``bye`` makes it close (1000, "bye"). It
    records each handshake's headers and every close code it receives."""

    def __init__(self, *, reject: bool = False) -> None:
        self.reject = reject
        self.handshakes: list[dict[str, str]] = []
        self.closes: list[int | None] = []
        self.ended = 0  # connections over (TCP closed either way)
        self.received: list[str | bytes] = []

    async def _connection(self, stream: trio.abc.Stream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            for _ in range(READS * 10):
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                ws.receive_data(data or None)
                for event in ws.events():
                    if not await self._on(stream, ws, event):
                        return
                if not data:
                    return
        finally:
            self.ended += 1
            await stream.aclose()

    async def _on(self, stream: trio.abc.Stream, ws: WSConnection, event: Event) -> bool:
        if isinstance(event, Request):
            seen = {k.decode().lower(): v.decode() for k, v in event.extra_headers}
            self.handshakes.append({**seen, "host": event.host})
            if self.reject:
                await stream.send_all(
                    ws.send(
                        RejectConnection(
                            status_code=403,
                            headers=[(b"content-type", b"text/plain"), (b"content-length", b"4")],
                            has_body=True,
                        )
                    )
                    + ws.send(RejectData(data=b"nope"))
                )
                return False
            await stream.send_all(ws.send(AcceptConnection()))
        elif isinstance(event, TextMessage | BytesMessage):
            self.received.append(event.data)
            if event.data == "bye":
                await stream.send_all(ws.send(CloseConnection(code=1000, reason="bye")))
            else:  # piece by piece, as it arrives
                finished = event.message_finished
                await stream.send_all(ws.send(Message(data=event.data, message_finished=finished)))
        elif isinstance(event, Ping):
            await stream.send_all(ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.closes.append(event.code)
            with contextlib.suppress(Exception):  # it was the answer to our own close
                await stream.send_all(ws.send(event.response()))
            return False
        return True


class TLSEchoServer(EchoServer):
    """The echo server over TLS (wss:// toward the upstream)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context

    async def _connection(self, stream: trio.abc.Stream) -> None:
        await super()._connection(trio.SSLStream(stream, self.context, server_side=True))


class Client:
    """A WebSocket client on a trio socket, driven one event at a time."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[Event] = []

    async def event(self) -> Event | None:
        """The next event, or None once the gateway has closed the TCP connection."""
        with trio.fail_after(WAIT):
            for _ in range(READS):
                if self.pending:
                    return self.pending.pop(0)
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None  # (wsproto would make a 1006 close of it)
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        raise AssertionError("too many reads")

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def echo(self, data: str | bytes) -> str | bytes:
        await self.send(Message(data=data))
        pieces = []
        for _ in range(READS):
            event = await self.event()
            assert isinstance(event, TextMessage | BytesMessage), event
            pieces.append(event.data)
            if event.message_finished:
                break
        return "".join(pieces) if isinstance(data, str) else b"".join(pieces)  # type: ignore[arg-type]

    async def close_code(self) -> int | None:
        """Read until the gateway's (or upstream's) close frame: its code."""
        for _ in range(READS):
            event = await self.event()
            if event is None:
                return None
            if isinstance(event, CloseConnection):
                return event.code
        raise AssertionError("no close frame")


@asynccontextmanager
async def ws_connect(
    port: int,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[Client, Event]]:
    """The handshake through the gateway (over TLS with ``tls``): the
    client and the first event (AcceptConnection, or RejectConnection whose
    body follows)."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if tls is not None:
        stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
    ws = WSConnection(ConnectionType.CLIENT)
    client = Client(stream, ws)
    try:
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await stream.send_all(ws.send(Request(host="gw.example", target=path, extra_headers=extra)))
        first = await client.event()
        assert first is not None, "the gateway closed without an answer"
        yield client, first
    finally:
        await stream.aclose()


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes, read until the gateway closes: status, headers, body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    with trio.fail_after(WAIT):
        await stream.send_all(request)
        for _ in range(READS):
            data = await stream.receive_some(65536)
            if not data:
                break
            got += data
    await stream.aclose()
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return status, {k.lower(): v for k, v in fields.items()}, body


def upgrade_head(path: str = "/ws", **fields: str) -> bytes:
    base = {
        "Host": "gw.example",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    base.update({k.replace("_", "-"): v for k, v in fields.items()})
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in base.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def problem(status: int, body: bytes, code: str) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.json.decode(body)
    assert (doc["status"], doc["code"]) == (status, code), doc
    return doc


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    echo: EchoServer,
    *,
    plugins: dict[str, dict[str, Any]] | None = None,
    websocket: object = True,
    extra_routes: list[dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Harness, int]]:
    """The echo server and a real gateway in front of it: route ``ws`` on
    ``/ws`` (with ``websocket`` and ``plugins``); the proxy's port."""
    async with trio.open_nursery() as nursery:
        await nursery.start(echo.run)
        routes = [
            {
                "name": "ws",
                "path": "/ws",
                "upstream": "test",
                "plugins": plugins or {},
                "websocket": websocket,
            },
            *(extra_routes or []),
        ]
        url = (
            echo.url if not isinstance(echo, TLSEchoServer) else echo.url.replace("http:", "https:")
        )
        config = harness_config(
            tmp_path / "data", url, routes=routes, server=server, upstream_settings=upstream
        )
        config = msgspec.structs.replace(
            config, log=LogConfig(access_log=str(tmp_path / "access.log"))
        )
        async with open_harness(tmp_path, config=config) as h:
            port = int(h.info.proxy_url.rsplit(":", 1)[1])
            yield h, port
        nursery.cancel_scope.cancel()


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def new_key(h: Harness, **fields: Any) -> tuple[str, str]:
    r = await h.admin.post("/setup", json={"name": "root", "email": "root@example.com"})
    if r.status_code == 201:
        h.admin.headers["Authorization"] = f"Bearer {r.json()['key']}"
    r = await h.admin.post("/keys", json={"name": "k", "owner": "o", "scopes": [], **fields})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["key"]


# ---- echo and the handshake ----------------------------------------------------------------


async def test_text_and_binary_are_echoed_through_the_gateway(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (_h, port), ws_connect(port) as (client, first):
        assert isinstance(first, AcceptConnection), first
        assert await client.echo("hello") == "hello"
        assert await client.echo(b"\x00\x01binary\xff") == b"\x00\x01binary\xff"
        big = os.urandom(200_000)  # several reads and writes each way
        assert await client.echo(big) == big
        for i in range(20):
            assert await client.echo(f"message {i}") == f"message {i}"
        # The upstream got the gateway's forwarding headers with the upgrade.
        (seen,) = echo.handshakes
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert seen["x-forwarded-host"] == "gw.example"
        assert seen["x-request-id"]
        assert seen["host"] == f"127.0.0.1:{echo.port}"
        await client.send(CloseConnection(code=1000, reason="done"))
        assert await client.close_code() == 1000
    line = [msgspec.json.decode(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert [(x["status"], x["route"]) for x in line] == [(101, "ws")]


@pytest.mark.parametrize(
    ("fields", "version_header"),
    [
        ({"Sec_WebSocket_Key": "short"}, False),
        ({"Sec_WebSocket_Key": base64.b64encode(b"x" * 15).decode() + "="}, False),
        ({"Sec_WebSocket_Version": "8"}, True),
    ],
    ids=["key-not-base64-16", "key-15-bytes", "version-8"],
)
async def test_a_wrong_key_or_version_is_400_with_a_code(
    tmp_path: Path, fields: dict[str, str], version_header: bool
) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (_h, port):
        status, headers, body = await raw_exchange(port, upgrade_head(**fields))
        assert status == 400
        assert headers["content-type"] == "application/problem+json"
        problem(400, body, "INVALID_WEBSOCKET_HANDSHAKE")
        assert ("sec-websocket-version" in headers) is version_header
        assert echo.handshakes == []  # nothing reached the upstream
        # The gateway goes on serving.
        async with ws_connect(port) as (client, first):
            assert isinstance(first, AcceptConnection)
            assert await client.echo("still here") == "still here"


async def test_other_upgrades_are_still_refused_as_before(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (_h, port):
        h2c = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        _, _, body = await raw_exchange(port, h2c)
        problem(400, body, "BAD_REQUEST")
        # Pipelined behind another request: not taken over either.
        plain = b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n"
        _, _, body = await raw_exchange(port, plain + upgrade_head())
        problem(400, body, "BAD_REQUEST")
        assert echo.handshakes == []


async def test_websocket_false_refuses_the_upgrade_with_a_code(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo, websocket=False) as (_h, port):
        _, _, body = await raw_exchange(port, upgrade_head())
        doc = problem(400, body, "WEBSOCKET_DISABLED")
        assert "ws" in doc["detail"]
        assert echo.handshakes == []


async def test_an_upstream_that_does_not_switch_is_relayed_as_is(tmp_path: Path) -> None:
    echo = EchoServer(reject=True)
    async with gateway(tmp_path, echo) as (_h, port):
        status, headers, body = await raw_exchange(port, upgrade_head())
        assert status == 403
        assert body == b"nope"
        assert headers["content-type"] == "text/plain"
        assert "upgrade" not in headers
        assert len(echo.handshakes) == 1


# ---- the access phase ---------------------------------------------------------------------------


async def test_key_auth_refuses_an_upgrade_without_a_key(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo, plugins={"key-auth": {}}) as (h, port):
        status, headers, body = await raw_exchange(port, upgrade_head())
        assert status == 401
        assert headers["content-type"] == "application/problem+json"
        problem(401, body, "MISSING_KEY")
        status, _, body = await raw_exchange(port, upgrade_head(Authorization="Bearer tg_nope"))
        problem(401, body, "INVALID_KEY")
        assert echo.handshakes == []
        key_id, key = await new_key(h)
        async with ws_connect(port, headers={"Authorization": f"Bearer {key}"}) as (c, first):
            assert isinstance(first, AcceptConnection)
            assert await c.echo("authorised") == "authorised"
        assert echo.handshakes[0]["x-key-id"] == key_id


async def test_a_rate_limited_key_is_refused_and_the_upgrade_counts_once(tmp_path: Path) -> None:
    echo = EchoServer()
    plugins = {"key-auth": {}, "rate-limit": {"limit": 1, "period_seconds": 60, "by": "key"}}
    async with gateway(tmp_path, echo, plugins=plugins) as (h, port):
        key_id, key = await new_key(h)
        auth = {"Authorization": f"Bearer {key}"}
        async with ws_connect(port, headers=auth) as (client, first):
            assert isinstance(first, AcceptConnection)
            for i in range(5):  # messages are not requests
                assert await client.echo(f"m{i}") == f"m{i}"
            _, headers, body = await raw_exchange(port, upgrade_head(Authorization=f"Bearer {key}"))
            problem(429, body, "RATE_LIMITED")
            assert "retry-after" in headers
            await client.send(CloseConnection(code=1000))
            assert await client.close_code() == 1000
        gw = h.server.gateway
        assert gw is not None
        await gw.actors.flush(list(gw.actors.actors.values()))
        r = await h.admin.get(f"/keys/{key_id}/usage")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["requests"] == 2  # the upgrade and the refused one
        assert doc["by_status_class"]["1xx"] == 1
        assert doc["by_status_class"]["4xx"] == 1
        assert len(echo.handshakes) == 1


# ---- closing ------------------------------------------------------------------------------------


async def test_upstream_close_reaches_the_client(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (_h, port), ws_connect(port) as (client, first):
        assert isinstance(first, AcceptConnection)
        await client.send(Message(data="bye"))
        event = await client.event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1000, "bye")
        await client.send(event.response())
        assert await client.event() is None  # then the TCP close
        await until(lambda: echo.ended == 1)


async def test_client_close_reaches_the_upstream(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (_h, port), ws_connect(port) as (client, first):
        assert isinstance(first, AcceptConnection)
        assert await client.echo("x") == "x"
        await client.send(CloseConnection(code=4000, reason="client done"))
        assert await client.close_code() == 4000  # the upstream's answer, relayed
        await until(lambda: echo.closes == [4000])
        assert await client.event() is None


async def test_a_client_that_vanishes_closes_the_upstream(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (_h, port):
        async with ws_connect(port) as (client, first):
            assert isinstance(first, AcceptConnection)
            assert await client.echo("x") == "x"
        # The client's TCP close (no close frame) ends the upstream's side too.
        await until(lambda: echo.ended == 1)


async def test_the_idle_timeout_closes_both_sides(tmp_path: Path) -> None:
    echo = EchoServer()
    settings = {"idle_timeout_seconds": 0.3}
    async with (
        gateway(tmp_path, echo, websocket=settings) as (_h, port),
        ws_connect(port) as (client, first),
    ):
        assert isinstance(first, AcceptConnection)
        assert await client.echo("x") == "x"
        event = await client.event()  # nothing sent: the gateway's close
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1001, "idle timeout")
        await until(lambda: echo.closes == [1001])


async def test_a_frame_over_the_cap_closes_1009_and_others_go_on(tmp_path: Path) -> None:
    echo = EchoServer()
    settings = {"max_frame_bytes": 1000}
    async with gateway(tmp_path, echo, websocket=settings) as (_h, port):
        async with ws_connect(port) as (other, first):
            assert isinstance(first, AcceptConnection)
            async with ws_connect(port) as (client, first):
                assert isinstance(first, AcceptConnection)
                assert await client.echo(b"a" * 1000) == b"a" * 1000  # the cap itself is fine
                await client.send(Message(data=b"b" * 5000))
                assert await client.close_code() == 1009
                await until(lambda: echo.closes == [1009])
                assert b"b" * 5000 not in echo.received
            assert await other.echo("unaffected") == "unaffected"
        async with ws_connect(port) as (client, first):
            assert isinstance(first, AcceptConnection)
            assert await client.echo("new") == "new"


async def test_shutdown_sends_1001_to_both_sides(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (h, port), ws_connect(port) as (client, first):
        assert isinstance(first, AcceptConnection)
        assert await client.echo("before") == "before"
        r = await h.admin.get("/metrics")
        assert "triogate_websocket_connections_open 1.0" in r.text
        assert 'triogate_websocket_upgrades_total{outcome="upgraded"}' in r.text
        h.server.shutdown()
        event = await client.event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1001, "going away")
        await client.send(event.response())
        await until(lambda: echo.closes == [1001])
        with trio.fail_after(WAIT):
            await h.server.stopped.wait()


async def test_wss_through_the_tls_listener(tmp_path: Path) -> None:
    from tests.helpers_tls import make_certs

    certs = make_certs(tmp_path / "certs")
    tls = {"tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file)}}
    echo = EchoServer()
    async with gateway(tmp_path, echo, server=tls) as (h, port):
        assert h.info.proxy_url.startswith("https://")
        async with ws_connect(port, tls=certs.client_context()) as (client, first):
            assert isinstance(first, AcceptConnection), first
            assert await client.echo("over tls") == "over tls"
            big = os.urandom(100_000)
            assert await client.echo(big) == big
            assert echo.handshakes[0]["x-forwarded-proto"] == "https"
            await client.send(CloseConnection(code=1000))
            assert await client.close_code() == 1000
            await until(lambda: echo.closes == [1000])


class WrongSwitch(EchoServer):
    """Answers every handshake with a 101 whose accept token is not the key's."""

    async def _connection(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(WAIT):
            await stream.receive_some(65536)
            self.handshakes.append({})
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSBrZXkncyB0b2tlbiE=\r\n\r\n"
            )
            await stream.receive_some(65536)  # until the gateway hangs up
        await stream.aclose()


async def test_a_101_for_another_key_is_a_bad_gateway(tmp_path: Path) -> None:
    echo = WrongSwitch()
    async with gateway(tmp_path, echo) as (_h, port):
        _, headers, body = await raw_exchange(port, upgrade_head())
        problem(502, body, "BAD_GATEWAY")
        assert "upgrade" not in headers
        assert len(echo.handshakes) == 1


async def test_wss_to_an_https_upstream(tmp_path: Path) -> None:
    from tests.helpers_tls import make_certs

    certs = make_certs(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    echo = TLSEchoServer(context)
    upstream = {"ca_file": str(certs.ca_file)}
    async with gateway(tmp_path, echo, upstream=upstream) as (_h, port):
        async with ws_connect(port) as (client, first):
            assert isinstance(first, AcceptConnection), first
            assert await client.echo("to a TLS upstream") == "to a TLS upstream"
            big = os.urandom(100_000)
            assert await client.echo(big) == big
            await client.send(CloseConnection(code=1000))
            assert await client.close_code() == 1000
            await until(lambda: echo.closes == [1000])
        # An upstream whose certificate the gateway cannot verify: 502, no relay.
        async with gateway(tmp_path / "unverified", TLSEchoServer(context)) as (_h2, port2):
            _, _, body = await raw_exchange(port2, upgrade_head())
            problem(502, body, "UPSTREAM_TLS_ERROR")
