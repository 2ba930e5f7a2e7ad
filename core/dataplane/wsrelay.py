"""The bytes of an upgraded WebSocket connection, piped both ways.

One task per direction reads what one side sends (at most ``READ_SIZE`` at a
time) and writes it to the other before it reads again: the only buffer is
that one read, so a side that reads slowly slows the side that writes (TCP
back-pressure end to end) and memory per connection stays bounded. Frames
are not decoded: a ``wsframes.FrameTracker`` per direction reads the frame
headers only (the size cap, where a frame of the gateway's own may go, and
whether a close frame went by; wsframes.py says why).

How a relay ends (``Ending``), and what each side gets:

* ``CLOSED``: the two sides closed the connection themselves. A close frame
  from one side is relayed like any frame; the end of one side's stream
  (EOF) is passed on as a half-close of the other's (``shutdown(SHUT_WR)``),
  so the closing handshake completes end to end. Once one side has ended,
  the other has ``CLOSE_LINGER_SECONDS`` to end too.
* ``IDLE``: no byte either way for the route's ``idle_timeout_seconds`` (or
  a side that stopped reading for that long): both sides get close 1001.
* ``TOO_BIG``: a frame declared a payload over ``max_frame_bytes``; nothing
  of it is forwarded, both sides get close 1009.
* ``DRAIN``: the gateway is shutting down: both sides get close 1001
  ("going away"). The listener wakes a relay parked on its client
  (``conn.idle`` is set for the whole relay: shutdown closes idle
  connections); a relay that is moving bytes sees ``closing`` after its
  current read. Cancelled at the end of the grace period, it still sends
  its close frames (a non-blocking write each) before closing.
* ``BROKEN``: a side reset the connection: the other gets close 1001.

A close frame of the gateway's own goes only to a side whose incoming
stream is between two frames (never inside one; otherwise the TCP close
alone tells it), and not after a close frame already went to it. After
sending its close frames the gateway half-closes both sides and reads
(discarding) until they close or ``CLOSE_LINGER_SECONDS`` pass.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import ssl
from collections.abc import Callable
from typing import Final

import trio

from triogate.config_websocket import WebSocketConfig
from triogate.dataplane import sockio
from triogate.http.wsframes import GOING_AWAY, MESSAGE_TOO_BIG, FrameTracker, close_frame

__all__ = ["CLOSE_LINGER_SECONDS", "READ_SIZE", "Ending", "Relay"]

READ_SIZE: Final = 65536
CLOSE_LINGER_SECONDS: Final = 2.0
LINGER_READS: Final = 64  # reads of what a side sends after the gateway's close


class Ending(enum.Enum):
    CLOSED = "closed"
    IDLE = "idle"
    TOO_BIG = "too_big"
    DRAIN = "drain"
    BROKEN = "broken"


_CLOSE_CODES: Final = {
    Ending.IDLE: (GOING_AWAY, "idle timeout"),
    Ending.TOO_BIG: (MESSAGE_TOO_BIG, "frame too big"),
    Ending.DRAIN: (GOING_AWAY, "going away"),
    Ending.BROKEN: (GOING_AWAY, "peer gone"),
}


class _Direction:
    """Bytes from ``src`` to ``dst``, and what is known of that stream."""

    __slots__ = ("dst", "ended", "sending", "src", "to_server", "tracker")

    def __init__(
        self, src: socket.socket, dst: socket.socket, max_frame: int, to_server: bool
    ) -> None:
        self.src = src
        self.dst = dst
        self.tracker = FrameTracker(max_frame)
        self.to_server = to_server
        self.sending = False  # a write to dst is under way (may stop mid-frame)
        self.ended = False  # src sent EOF and it was passed on

    def clean(self) -> bool:
        """A close frame of the gateway's own may go to ``dst`` now."""
        return not self.sending and self.tracker.at_boundary and not self.tracker.close_seen


def _half_close(sock: socket.socket) -> None:
    # An SSLSocket's shutdown() drops its TLS state: there the full close
    # at the end of the relay is the only one.
    if isinstance(sock, ssl.SSLSocket):
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


class Relay:
    """One upgraded connection: ``client`` and ``upstream`` sockets
    (non-blocking), the route's settings, and ``closing`` (the listener is
    draining). ``run`` returns how it ended; the caller closes the sockets."""

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        settings: WebSocketConfig,
        closing: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.closing = closing
        self.up = _Direction(client, upstream, settings.max_frame_bytes, to_server=True)
        self.down = _Direction(upstream, client, settings.max_frame_bytes, to_server=False)
        self.last = trio.current_time()  # the last byte either way
        self.cutoff = float("inf")  # set when one side has ended: the other's limit
        self.ending: Ending | None = None
        self._scope: trio.CancelScope | None = None

    def _end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, client_rest: bytes = b"", upstream_rest: bytes = b"") -> Ending:
        """Relay until the connection ends. ``client_rest`` and
        ``upstream_rest``: bytes of the new protocol that came with the
        handshake (sent before anything else)."""
        try:
            with trio.CancelScope() as self._scope:
                if client_rest and not await self._forward(self.up, client_rest):
                    return self._finish()
                if upstream_rest and not await self._forward(self.down, upstream_rest):
                    return self._finish()
                if self.closing():  # the drain began during the handshake
                    self._end(Ending.DRAIN)
                    return self._finish()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, self.up)
                    nursery.start_soon(self._pipe, self.down)
        except BaseException:
            # Cancelled from outside (the shutdown grace period is over): the
            # close frames still go, without waiting for anything.
            if self.ending is None:
                self.ending = Ending.DRAIN if self.closing() else Ending.BROKEN
            self._send_closes()
            raise
        return self._finish()

    def _finish(self) -> Ending:
        if self.ending is None:
            self.ending = Ending.CLOSED
        return self.ending

    async def linger(self) -> None:
        """After the gateway ended the relay: its close frames, a
        half-close, then what the sides still send is read and dropped until
        they close (bounded), so their close frames are not answered by a
        reset."""
        if self.ending in (None, Ending.CLOSED):
            return
        self._send_closes()
        for side in (self.up.dst, self.down.dst):
            _half_close(side)
        deadline = trio.current_time() + CLOSE_LINGER_SECONDS
        for sock in (self.up.src, self.down.src):
            for _ in range(LINGER_READS):
                try:
                    data = await sockio.recv(sock, READ_SIZE, deadline)
                except (OSError, trio.ClosedResourceError):
                    break
                if not data:  # closed, or the linger is over
                    break

    def _send_closes(self) -> None:
        if self.ending is None or self.ending is Ending.CLOSED:
            return
        code, reason = _CLOSE_CODES[self.ending]
        for direction in (self.up, self.down):
            if direction.clean():
                direction.tracker.close_seen = True  # once only
                frame = close_frame(code, reason, to_server=direction.to_server)
                with contextlib.suppress(OSError):
                    direction.dst.send(frame)  # a few bytes: the kernel takes them

    async def _forward(self, direction: _Direction, data: bytes) -> bool:
        """Send what may go of ``data`` on; False once the relay must end."""
        forward, too_big = direction.tracker.feed(data)
        if forward:
            direction.sending = True
            try:
                await self._send(direction.dst, forward)
            except TimeoutError:
                self._end(Ending.IDLE)  # the other side stopped reading
                return False
            except trio.ClosedResourceError:
                self._end(Ending.DRAIN if self.closing() else Ending.BROKEN)
                return False
            except OSError:
                self._end(Ending.BROKEN)
                return False
            direction.sending = False
        if too_big is not None:
            self._end(Ending.TOO_BIG)
            return False
        return True

    async def _send(self, dst: socket.socket, data: bytes) -> None:
        """Write all of ``data`` to ``dst``; TimeoutError once ``dst`` has
        taken nothing for ``idle_timeout_seconds``. Each time ``dst`` takes
        more counts as activity (``last``): a slow client that keeps reading
        one long write is not idle. Both directions wait on each socket (one
        reads it, the other writes it), and a wait's timeout wakes every
        waiter on its socket (sockio's watchdog): woken so without a drain,
        this write just waits again."""
        try:
            sent = dst.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        idle = self.settings.idle_timeout_seconds
        while view:
            try:
                sent = dst.send(view)
            except BlockingIOError:
                try:
                    writable = await sockio.park(dst, trio.current_time() + idle, write=True)
                except trio.ClosedResourceError:
                    if self.closing():
                        raise
                    continue  # another wait's timeout (a closed socket fails the send)
                if not writable:
                    raise TimeoutError("the peer stopped reading") from None
                self.last = trio.current_time()
                continue
            view = view[sent:]

    async def _pipe(self, direction: _Direction) -> None:
        src = direction.src
        idle = self.settings.idle_timeout_seconds
        while True:
            try:
                data: bytes | None = src.recv(READ_SIZE)
            except BlockingIOError:
                data = None
            except OSError:
                self._end(Ending.BROKEN)
                return
            waited = data is None
            if waited:
                try:
                    data = await sockio.wait_recv(
                        src, READ_SIZE, min(self.last + idle, self.cutoff)
                    )
                except trio.ClosedResourceError:
                    # Woken by shutdown (the listener closes idle connections),
                    # by the other direction's end (a new, shorter limit), or
                    # by the timeout of the other direction's write to this
                    # socket: look again (a closed socket fails the recv).
                    if self.closing():
                        self._end(Ending.DRAIN)
                        return
                    continue
                except OSError:
                    self._end(Ending.BROKEN)
                    return
                if data is None:
                    now = trio.current_time()
                    if now >= self.cutoff:
                        self._end(Ending.CLOSED)  # the other side ended long ago
                        return
                    if now >= self.last + idle:
                        self._end(Ending.IDLE)
                        return
                    continue  # the other direction moved meanwhile
            if not data:
                # This side is done sending: pass the EOF on, and give the
                # other side a little while to finish too.
                direction.ended = True
                _half_close(direction.dst)
                if self.up.ended and self.down.ended:
                    self._end(Ending.CLOSED)
                else:
                    self.cutoff = trio.current_time() + CLOSE_LINGER_SECONDS
                    other = self.down if direction is self.up else self.up
                    sockio.interrupt(other.src)  # to wait with the new limit
                return
            self.last = trio.current_time()
            if not await self._forward(direction, data):
                return
            if self.closing():
                self._end(Ending.DRAIN)
                return
            if not waited:
                # Read and written without parking (a peer that sends faster
                # than it is relayed): yield once, so no connection can
                # starve the others.
                await trio.lowlevel.checkpoint()
