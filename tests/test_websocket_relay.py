"""The relay (core/dataplane/wsrelay.py) on its own, between two real socket
pairs: back-pressure (a side that does not read stops the relay reading the
other), half-closes passed on, how each ending is reported, the gateway's
close frames only between frames."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message

from triogate.config_websocket import WebSocketConfig
from triogate.dataplane.wsrelay import Ending, Relay

WAIT = 10.0


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    return a, b


class Ends:
    """The client's and the upstream's own ends, and the relay between."""

    def __init__(self, settings: WebSocketConfig) -> None:
        self.client, client_gw = pair()
        upstream_gw, self.upstream = pair()
        self.closing = False
        self.relay = Relay(client_gw, upstream_gw, settings, lambda: self.closing)
        self.ending: Ending | None = None

    async def run(self) -> None:
        self.ending = await self.relay.run()
        await self.relay.linger()
        for sock in (self.relay.up.src, self.relay.down.src):
            sock.close()


@asynccontextmanager
async def relaying(settings: WebSocketConfig | None = None) -> AsyncIterator[Ends]:
    ends = Ends(settings or WebSocketConfig())
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ends.run)
            yield ends
    ends.client.close()
    ends.upstream.close()


async def read_all(sock: socket.socket, limit: int) -> bytes:
    """Everything until EOF (bounded by ``limit`` bytes)."""
    out = b""
    while len(out) <= limit:
        await trio.lowlevel.wait_readable(sock)
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        if not data:
            return out
        out += data
    raise AssertionError("more than expected")


async def test_a_side_that_does_not_read_stops_the_relay_reading_the_other() -> None:
    async with relaying(WebSocketConfig(max_frame_bytes=2**31)) as ends:
        # One frame declaring 1 GiB: the relay forwards its payload unread.
        head = Connection(ConnectionType.CLIENT).send(Message(data=b"x" * 70000))[:14]
        head = head[:2] + (2**30).to_bytes(8, "big") + head[10:]
        ends.client.send(head)
        written = len(head)
        chunk = b"\0" * 65536
        blocked = False
        for _ in range(20000):  # 1.3 GB if nothing pushed back
            try:
                written += ends.client.send(chunk)
            except BlockingIOError:
                await trio.sleep(0.05)  # give the relay every chance to read on
                try:
                    written += ends.client.send(chunk)
                except BlockingIOError:
                    blocked = True
                    break
        assert blocked, "the writer was never slowed down"
        # Bounded by the kernel's buffers and one read, not by the 1 GiB frame.
        assert written < 64 * 1024 * 1024
        ends.client.shutdown(socket.SHUT_WR)
        got = await read_all(ends.upstream, written)
        assert len(got) == written  # every byte, once the upstream reads
        ends.upstream.close()
    assert ends.ending is Ending.CLOSED


async def test_half_closes_are_passed_on_both_ways() -> None:
    async with relaying() as ends:
        frame = Connection(ConnectionType.CLIENT).send(CloseConnection(code=1000))
        ends.client.send(frame)
        ends.client.shutdown(socket.SHUT_WR)
        assert await read_all(ends.upstream, 1000) == frame  # then its EOF
        answer = Connection(ConnectionType.SERVER).send(CloseConnection(code=1000))
        ends.upstream.send(answer)  # the upstream can still write
        ends.upstream.shutdown(socket.SHUT_WR)
        assert await read_all(ends.client, 1000) == answer
    assert ends.ending is Ending.CLOSED


async def test_a_drain_closes_between_frames_only() -> None:
    async with relaying() as ends:
        server = Connection(ConnectionType.SERVER)
        whole = server.send(Message(data=b"y" * 1000))
        ends.upstream.send(whole[:500])  # the client's stream is mid-frame
        for _ in range(100):
            if not ends.relay.down.tracker.at_boundary:
                break
            await trio.sleep(0.01)
        ends.closing = True
        ends.client.send(Connection(ConnectionType.CLIENT).send(Message(data="wake")))
        got_upstream = await read_all(ends.upstream, 10000)
        got_client = await read_all(ends.client, 10000)
    assert ends.ending is Ending.DRAIN
    # The upstream's stream was between frames: its close frame came (1001).
    reader = Connection(ConnectionType.SERVER)
    reader.receive_data(got_upstream)
    events = list(reader.events())
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1001
    # The client's was inside a frame: no frame of the gateway's own in it.
    assert got_client == whole[:500]


async def test_the_idle_timeout_ends_the_relay_with_1001() -> None:
    async with relaying(WebSocketConfig(idle_timeout_seconds=0.2)) as ends:
        got = await read_all(ends.client, 1000)
    assert ends.ending is Ending.IDLE
    reader = Connection(ConnectionType.CLIENT)
    reader.receive_data(got)
    (event,) = list(reader.events())
    assert isinstance(event, CloseConnection)
    assert (event.code, event.reason) == (1001, "idle timeout")
