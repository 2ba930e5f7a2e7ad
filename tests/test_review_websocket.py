"""Review of WebSocket proxying (R4): hostile clients and upstreams against
the real gateway (native listener, real LMDB in a temp dir) on 127.0.0.1.
Each test pins a defect found in review, or an attack the gateway must
survive (smuggling through the upgrade, bad 101s, leaks on error paths).

Waits are bounded (``WAIT`` seconds, loops by count); nothing asserts a
duration."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Message
from wsproto.utilities import generate_accept_token

from tests.test_websocket import (
    WAIT,
    EchoServer,
    gateway,
    problem,
    raw_exchange,
    until,
    upgrade_head,
    ws_connect,
)
from tests.test_websocket_relay import relaying
from triogate.config_websocket import WebSocketConfig
from triogate.dataplane.wsrelay import Ending, Relay
from triogate.dataplane.wsstats import STATS
from triogate.http.wsframes import FrameTracker
from triogate.testing import Harness, LoopbackServer


class RawUpstream(LoopbackServer):
    """An upstream that records what it receives on each connection and
    answers the first request head with ``answer(head)`` (bytes), then keeps
    reading (recording) until the gateway closes."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.received: list[bytes] = []

    async def _connection(self, stream: trio.SocketStream) -> None:
        index = len(self.received)
        self.received.append(b"")
        answered = False
        with trio.move_on_after(WAIT):
            for _ in range(200):
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                self.received[index] += data
                if not answered and b"\r\n\r\n" in self.received[index]:
                    answered = True
                    await stream.send_all(self.answer(self.received[index]))
        await stream.aclose()


def key_of(head: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip()
    return b""


def switch(head: bytes) -> bytes:
    """A correct 101 for the head's key."""
    accept = generate_accept_token(key_of(head))
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    got = b""
    with trio.fail_after(WAIT):
        for _ in range(200):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            got += data
    return got


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: gw.example\r\n\r\n"


async def read_for(stream: trio.SocketStream, seconds: float) -> bytes:
    """What arrives within ``seconds`` (or until the gateway closes)."""
    got = b""
    with trio.move_on_after(seconds):
        for _ in range(200):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            got += data
    return got


# ---- the idle timeout -----------------------------------------------------------------------


async def test_a_slow_reader_that_keeps_reading_is_not_idle() -> None:
    """Defect: ``last`` moved only when the relay *read*: while one write to
    a slow client took longer than ``idle_timeout_seconds`` (the client
    reading steadily all along), the other direction's read timed out and
    the relay ended IDLE with bytes flowing. Now a write that progresses
    counts as activity."""
    settings = WebSocketConfig(idle_timeout_seconds=1.0, max_frame_bytes=2**31)
    async with relaying(settings) as ends:
        head = Connection(ConnectionType.SERVER).send(Message(data=b"x" * 70000))[:10]
        ends.upstream.send(head[:2] + (2**30).to_bytes(8, "big"))  # one endless frame

        async def upstream_streams() -> None:
            chunk = b"\0" * 65536
            for _ in range(2000):
                try:
                    ends.upstream.send(chunk)
                except BlockingIOError:
                    await trio.sleep(0.01)

        received = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream_streams)
            for _ in range(250):  # the client reads a little every 10 ms
                await trio.sleep(0.01)
                with contextlib.suppress(BlockingIOError):
                    received += len(ends.client.recv(8192))
                assert ends.relay.ending is None, f"ended {ends.relay.ending} after {received} B"
            nursery.cancel_scope.cancel()
        assert received > 65536
        ends.client.close()
        ends.upstream.close()
    assert ends.ending is Ending.BROKEN or ends.ending is Ending.CLOSED


# ---- smuggling through the upgrade --------------------------------------------------------------


def answer_any(head: bytes) -> bytes:
    """A 101 to a WebSocket upgrade, 200 ``ok`` to anything else."""
    if b"sec-websocket-key" in head.lower() and b"upgrade: websocket" in head.lower():
        return switch(head)
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_an_upgrade_behind_a_request_body_is_not_served_as_a_plain_request(
    tmp_path: Path,
) -> None:
    """Defect: an upgrade head arriving in the same read as the end of the
    previous request's chunked body made that (complete, valid) body fail
    (400, the connection kept), then the upgrade was served as a plain GET
    with its Upgrade stripped and what followed it silently dropped. A
    connection whose body reading broke is now closed after its answer."""
    up = RawUpstream(answer_any)
    async with gateway(tmp_path, up) as (_h, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /ws HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await until(lambda: len(up.received) == 1)  # the body is being streamed
        await stream.send_all(b"0\r\n\r\n" + upgrade_head() + SMUGGLED)
        got = await read_until_closed(stream)  # closed after one answer
        await stream.aclose()
        assert got.count(b"HTTP/1.1 ") == 1, got
        assert len(up.received) == 1, up.received  # the upgrade never left the gateway
        assert b"smuggled" not in b"".join(up.received)


def gauges(h: Harness) -> tuple[int, int, int, int, int]:
    """What must be back to 0 once nothing is open: connections, requests
    in flight (listener, pipeline, upstream and its targets) and relays."""
    proxy = h.server.proxy
    gw = h.server.gateway
    assert proxy is not None and gw is not None
    pipeline = gw.pipeline
    upstreams = pipeline.upstreams.values()
    # In flight, or holding a relayed WebSocket (counted as active).
    upstream_in_flight = sum(u.in_flight + sum(p.active for p in u.pools) for u in upstreams)
    return (
        len(proxy.connections),
        proxy.in_flight,
        pipeline.in_flight,
        upstream_in_flight,
        STATS.open,
    )


NOT_SWITCHING = {
    "426": b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
    "200-with-accept": b"HTTP/1.1 200 OK\r\nSec-WebSocket-Accept: x\r\nContent-Length: 0\r\n\r\n",
    "101-without-accept": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\n",
    "101-to-h2c": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
    b"Connection: Upgrade\r\n\r\n",
}


@pytest.mark.parametrize("answer", list(NOT_SWITCHING), ids=list(NOT_SWITCHING))
async def test_bytes_after_the_upgrade_never_reach_an_upstream_that_did_not_switch(
    tmp_path: Path, answer: str
) -> None:
    """WebSocket smuggling: what the client sends right behind its upgrade
    head is neither parsed as a request by the gateway nor forwarded unless
    the upstream switched to WebSocket for this key; the client gets one
    answer and a closed connection; nothing stays open or in flight."""
    up = RawUpstream(lambda _head: NOT_SWITCHING[answer])
    async with gateway(tmp_path, up) as (h, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(upgrade_head() + SMUGGLED)
        got = await read_until_closed(stream)
        await stream.aclose()
        assert got.count(b"HTTP/1.1 ") == 1, got
        status = int(got.split(b" ", 2)[1])
        assert status == (502 if answer.startswith("101") else int(answer[:3]))
        assert b"upgrade:" not in got.lower()
        (seen,) = up.received
        assert seen.count(b" HTTP/1.1\r\n") == 1 and b"smuggled" not in seen
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))


async def test_an_upstream_switching_a_plain_request_is_a_bad_gateway(tmp_path: Path) -> None:
    """``Upgrade: websocket`` without ``Connection: upgrade`` (here ``close``) is a plain GET:
    the Upgrade field is not forwarded, and an upstream that switches anyway
    is 502, never relayed."""
    up = RawUpstream(switch)
    async with gateway(tmp_path, up) as (h, port):
        status, _, body = await raw_exchange(port, upgrade_head(Connection="close"))
        assert status == 502
        problem(502, body, "BAD_GATEWAY")
        (seen,) = up.received
        assert b"upgrade" not in seen.lower()
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))


async def test_a_refused_upgrade_closes_and_its_frames_reach_nobody(tmp_path: Path) -> None:
    """key-auth refuses: 401, then the connection closes; the frames the
    client sent behind its head (and after) go nowhere."""
    up = RawUpstream(switch)
    async with gateway(tmp_path, up, plugins={"key-auth": {}}) as (h, port):
        frame = Connection(ConnectionType.CLIENT).send(Message(data="to nobody"))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(upgrade_head() + frame)
        got = await read_until_closed(stream)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(frame)
        await stream.aclose()
        assert got.startswith(b"HTTP/1.1 401 "), got
        assert b"connection: close" in got.lower()
        assert up.received == []
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))


# ---- fairness -----------------------------------------------------------------------------------


async def test_a_flooding_client_does_not_starve_the_event_loop() -> None:
    """Defect: a direction whose source always had bytes ready and whose
    destination always had room never checkpointed (every recv and send
    answered at once), so one client sending small frames faster than the
    relay parses them froze every other task of the gateway. Now each read
    that did not wait is followed by a checkpoint. The client and the
    upstream are threads here (outside the event loop, as real peers are);
    a task in the loop records how far the relay got between two of its
    turns."""
    client, client_gw = socket.socketpair()
    upstream_gw, upstream = socket.socketpair()
    for sock in (client_gw, upstream_gw):
        sock.setblocking(False)
    relay = Relay(client_gw, upstream_gw, WebSocketConfig(), lambda: False)
    frames = b"\x82\x80abcd" * 10000  # 10000 empty masked binary frames

    def flood() -> None:
        with contextlib.suppress(OSError):
            for _ in range(60):
                client.sendall(frames)
        client.shutdown(socket.SHUT_WR)

    def drain() -> None:
        with contextlib.suppress(OSError):
            for _ in range(100000):
                if not upstream.recv(1 << 20):
                    break

    threads = [threading.Thread(target=flood), threading.Thread(target=drain)]
    widest = 0  # frames relayed between two turns of another task
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            await trio.lowlevel.checkpoint()
            for thread in threads:
                thread.start()
            seen = 0
            for _ in range(10_000_000):
                await trio.lowlevel.checkpoint()
                now = relay.up.tracker.frames
                widest = max(widest, now - seen)
                seen = now
                if not threads[0].is_alive() and now == 600_000:
                    break
            nursery.cancel_scope.cancel()
    with contextlib.suppress(OSError):
        upstream.shutdown(socket.SHUT_RDWR)  # wakes the draining thread
    client.close()
    upstream.close()
    for thread in threads:
        thread.join(WAIT)
    # A read is at most 64 KiB (~11000 of these frames): a few reads per turn.
    assert widest <= 8 * 65536 // 6, widest


# ---- frames, handshakes, limits: attacks the gateway already withstands -----------------------


def test_a_64_bit_length_with_its_top_bit_set_is_over_any_cap() -> None:
    tracker = FrameTracker(max_payload=2**31)
    head = b"\x82\xff" + (2**63 + 5).to_bytes(8, "big") + b"mask"
    assert tracker.feed(b"\x81\x80mask" + head + b"payload") == (b"\x81\x80mask", 2**63 + 5)


HANDSHAKES = {
    "post": (b"POST /ws HTTP/1.1", {}, 400, "INVALID_WEBSOCKET_HANDSHAKE"),
    "http-1.0": (b"GET /ws HTTP/1.0", {}, 400, "INVALID_WEBSOCKET_HANDSHAKE"),
    "two-keys": (
        b"GET /ws HTTP/1.1",
        {"Sec-WebSocket-Key": "two"},
        400,
        "INVALID_WEBSOCKET_HANDSHAKE",
    ),
    "chunked-body": (
        b"GET /ws HTTP/1.1",
        {"Transfer-Encoding": "chunked"},
        400,
        "INVALID_WEBSOCKET_HANDSHAKE",
    ),
    "route-without-get": (b"GET /post-only HTTP/1.1", {}, 405, "METHOD_NOT_ALLOWED"),
}


@pytest.mark.parametrize("case", list(HANDSHAKES), ids=list(HANDSHAKES))
async def test_bad_handshakes_are_refused_with_a_code_and_reach_nobody(
    tmp_path: Path, case: str
) -> None:
    line, extra, status, code = HANDSHAKES[case]
    up = RawUpstream(switch)
    routes = [{"name": "p", "path": "/post-only", "methods": ["POST"], "upstream": "test"}]
    async with gateway(tmp_path, up, extra_routes=routes) as (h, port):
        head = upgrade_head()
        if "Sec-WebSocket-Key" in extra:  # a second, valid key
            head = head[:-2] + b"Sec-WebSocket-Key: " + key_of(head) + b"\r\n\r\n"
        elif extra:
            head = head[:-2] + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        head = line + head[head.index(b"\r\n") :]
        got_status, headers, body = await raw_exchange(port, head + SMUGGLED)
        assert got_status == status
        problem(status, body, code)
        assert headers.get("connection") == "close"
        assert up.received == []
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))


async def test_websockets_count_against_max_connections(tmp_path: Path) -> None:
    async with gateway(tmp_path, EchoServer(), server={"max_connections": 2}) as (h, port):
        async with ws_connect(port) as (_a, first_a), ws_connect(port) as (_b, first_b):
            assert isinstance(first_a, AcceptConnection)
            assert isinstance(first_b, AcceptConnection)
            status, _, body = await raw_exchange(port, upgrade_head())
            problem(503, body, "TOO_MANY_CONNECTIONS")
            assert status == 503
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))
        async with ws_connect(port) as (c, first_c):  # room again
            assert isinstance(first_c, AcceptConnection)
            assert await c.echo("again") == "again"


async def test_every_ending_leaves_nothing_open(tmp_path: Path) -> None:
    """The relays' gauge and every in-flight count are back to 0 after each
    way a relay ends (each counted once, by how it ended)."""
    echo = EchoServer()
    settings = {"max_frame_bytes": 1000, "idle_timeout_seconds": 0.5}
    async with gateway(tmp_path, echo, websocket=settings) as (h, port):
        before = dict(STATS.ended)
        # A client reset (no close frame, RST).
        async with ws_connect(port) as (client, _first):
            assert await client.echo("x") == "x"
            sock = client.stream.socket  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))
        # A frame over the cap.
        async with ws_connect(port) as (client, _first):
            await client.send(Message(data=b"b" * 5000))
            assert await client.close_code() == 1009
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))
        # The idle timeout.
        async with ws_connect(port) as (client, _first):
            assert await client.close_code() == 1001
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))
        # Closed by the two sides.
        async with ws_connect(port) as (client, _first):
            await client.send(CloseConnection(code=1000))
            assert await client.close_code() == 1000
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))
        ended = {k: STATS.ended[k] - before[k] for k in before}
        assert ended == {"closed": 1, "idle": 1, "too_big": 1, "drain": 0, "broken": 1}
    # One access-log line per upgrade, written when it was answered.
    lines = [msgspec.json.decode(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert [(x["status"], x["route"]) for x in lines] == [(101, "ws")] * 4


async def test_a_drain_sends_1001_to_every_open_websocket(tmp_path: Path) -> None:
    echo = EchoServer()
    async with gateway(tmp_path, echo) as (h, port), contextlib.AsyncExitStack() as stack:
        clients = []
        for i in range(12):
            client, first = await stack.enter_async_context(ws_connect(port))
            assert isinstance(first, AcceptConnection)
            if i % 2:
                assert await client.echo(f"busy {i}") == f"busy {i}"
            clients.append(client)
        assert STATS.open == 12
        h.server.shutdown()
        assert [await c.close_code() for c in clients] == [1001] * 12
        with trio.fail_after(WAIT):
            await h.server.stopped.wait()
        assert STATS.open == 0
        await until(lambda: sorted(echo.closes) == [1001] * 12)


# ---- balancing -------------------------------------------------------------------------------


def close_after(head: bytes) -> bytes:
    """``answer_any``, the plain answer closing its connection (so each
    request opens its own and is counted where it went)."""
    answer = answer_any(head)
    return answer.replace(b"Content-Length: 2\r\n", b"Connection: close\r\nContent-Length: 2\r\n")


async def test_least_connections_counts_open_websockets(tmp_path: Path) -> None:
    """Defect: a relayed WebSocket did not count as an active connection of
    its target, so ``balance = "least_connections"`` (the usual choice for
    long-lived connections) could not see it: the target holding the
    WebSockets got as many new requests as the idle one. Now it counts from
    the 101 until the relay ends."""
    first, second = RawUpstream(close_after), RawUpstream(close_after)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        upstream = {"targets": [first.url, second.url], "balance": "least_connections"}
        unused = RawUpstream(close_after)  # the helper's own upstream: not a target
        async with gateway(tmp_path, unused, upstream=upstream) as (h, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(upgrade_head())
            got = await read_for(stream, 1.0)
            assert got.startswith(b"HTTP/1.1 101 "), got
            holder = first if first.received else second
            other = second if holder is first else first
            assert len(holder.received) == 1 and other.received == []
            for _ in range(4):
                r = await h.client.get("/ws")
                assert r.status_code == 200, r.text
            assert len(other.received) == 4 and len(holder.received) == 1
            await stream.aclose()
            pools = h.server.gateway.pipeline.upstreams["test"].pools  # type: ignore[union-attr]
            await until(lambda: [p.active for p in pools] == [0, 0])
        nursery.cancel_scope.cancel()


async def test_a_slowloris_upgrade_head_times_out_with_408(tmp_path: Path) -> None:
    up = RawUpstream(switch)
    async with gateway(tmp_path, up, server={"header_timeout_seconds": 0.3}) as (h, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        head = upgrade_head()
        got = b""
        for i in range(len(head) - 2):  # a byte at a time, never the blank line
            await stream.send_all(head[i : i + 1])
            got = await read_for(stream, 0.05)
            if got:
                break
        got += await read_until_closed(stream)
        await stream.aclose()
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert up.received == []
        await until(lambda: gauges(h) == (0, 0, 0, 0, 0))
