"""One HTTP/1.1 connection to an upstream: a request out, its answer in.

``UpstreamConnection.exchange`` writes the request head (and streams the
body with back-pressure), then reads until the response head is parsed
(h1client.py's ``ResponseParser``). The response body is handed back as a
``Body`` that keeps reading from the same socket; when the message is
complete the connection goes back to its owner (a ``TargetPool``, or the
health checker's one-shot probe), and if the consumer abandons the body
(client gone) it is closed instead: a connection with unread bytes on it
can never be reused.

The common small response arrives in the same read as its head: then the
response carries ``content`` bytes and the connection is back in the pool
before the gateway writes a byte, which lets the listener send head and body
in one write.

An upstream may answer before it has read the request body (a 413 or a 401
on the head alone, a 200 that ignores the body) and then close: writing the
rest of the body then fails (EPIPE or ECONNRESET). That answer is already
in the socket's receive buffer (the reset came after it), so it is read
from there and returned, not turned into a 502 (``_early_answer``). The
rest of the request body is not sent on: the front door reads and drops a
short rest, or closes the client's connection after answering.

Errors: refused/reset/protocol garbage -> ``BadGateway``, no answer within
the read timeout -> ``UpstreamTimeout``; a reused connection that died
before any byte of the answer -> ``StaleConnection`` (the pool decides
whether to try again on a fresh one).

Charging: the exchange sets ``sent_upstream`` on its ``sink`` (the
pipeline's ``Context``) once any byte of the request head is in the
kernel's hands (CONTRACT §5); nothing is allocated for it per request.
"""

from __future__ import annotations

import socket
from typing import Protocol

import httptools
import trio

from triogate.dataplane import sockio
from triogate.dataplane.bodies import answer_body
from triogate.errors import BadGateway, UpstreamTimeout
from triogate.http import Body, Headers, Response
from triogate.http.h1client import MAX_RESPONSE_HEAD_BYTES, ResponseParser
from triogate.http.h1frame import LAST_CHUNK, encode_chunk

__all__ = ["READ_SIZE", "ConnectionOwner", "SentSink", "StaleConnection", "UpstreamConnection"]

READ_SIZE = 65536
# Reads of an answer already buffered when sending failed: a socket's
# receive buffer holds a few MB at most.
EARLY_ANSWER_READS = 64


class StaleConnection(Exception):
    """The connection died before any byte of the response: safe to retry."""


class SentSink(Protocol):
    """What learns that bytes of a request reached the upstream (the
    pipeline's ``Context``): from then on the request is charged."""

    sent_upstream: bool


class ConnectionOwner(Protocol):
    """Where a connection comes from and goes back to after an answer."""

    @property
    def authority(self) -> str: ...

    @property
    def send_timeout(self) -> float: ...

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None: ...


class UpstreamConnection:
    __slots__ = ("idle_since", "now", "parsed", "pool", "requests", "returned", "sock", "watched")

    def __init__(self, sock: socket.socket, pool: ConnectionOwner) -> None:
        self.sock = sock
        self.pool = pool
        self.requests = 0
        self.idle_since = 0.0
        self.returned = True  # no exchange under way
        self.parsed: ResponseParser | None = None
        # The run's clock, bound once (a connection lives in the run that
        # opened it): every answer's wait and the pool's ``idle_since`` read
        # it, and ``trio.current_time()`` costs three times the bound call.
        self.now = trio.lowlevel.current_clock().current_time
        self.watched = sockio.watched()  # the run's watchdog, found once

    def __repr__(self) -> str:
        return f"<UpstreamConnection to {self.pool.authority} after {self.requests} requests>"

    def close(self) -> None:
        sockio.close(self.sock)

    async def _send_all(self, data: bytes | memoryview) -> None:
        await sockio.send_all(self.sock, data, self.pool.send_timeout)

    async def _recv(self, read_timeout: float) -> bytes | None:
        """The next bytes from the upstream, or None after ``read_timeout``."""
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError:
            pass
        return await sockio.wait_recv(self.sock, READ_SIZE, self.now() + read_timeout, self.watched)

    def _early_answer(self, method: str) -> Response | None:
        """After writing the request failed: the complete answer the upstream
        sent before it stopped reading and closed, if it is already in the
        receive buffer (None when there is none, or only part of one). Never
        waits: a failed write means the upstream reset the connection (all
        it sent came before the reset) or stopped reading for
        ``send_timeout`` (an answer it sent meanwhile is here)."""
        parsed = ResponseParser(method == "HEAD")
        ended = False  # the upstream's side is over: a close-delimited body is whole
        try:
            for _ in range(EARLY_ANSWER_READS):
                try:
                    data = self.sock.recv(READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    ended = True
                    break
                if not data:
                    ended = True
                    break
                parsed.parser.feed_data(data)
                if parsed.complete:
                    break
        except (httptools.HttpParserError, BadGateway):
            return None
        if not parsed.headers_done or parsed.status == 101:
            return None
        if not parsed.complete and not (ended and parsed.close_delimited()):
            return None
        return Response(parsed.status, Headers(parsed.headers), content=b"".join(parsed.body))

    async def exchange(
        self,
        method: str,
        head: bytes,
        body: Body | None,
        read_timeout: float,
        sink: SentSink | None = None,
    ) -> Response:
        """Send one request and return the response (body still streaming).
        ``head`` frames ``body`` the way ``h1client`` decided: its length
        as Content-Length, or chunked when the length is not known.
        ``sink.sent_upstream`` turns true once bytes of it were written."""
        self.requests += 1
        generation = self.requests
        self.returned = False
        reused = self.requests > 1
        try:
            # The head in one direct ``send`` (inline: the common case never
            # waits): only it can tell a partial write from none when the
            # connection then fails. ``sink`` learns once any byte is out.
            try:
                sent = self.sock.send(head)
            except BlockingIOError:
                sent = 0
            if sent and sink is not None:
                sink.sent_upstream = True
            if sent < len(head):
                await self._send_all(memoryview(head)[sent:])
                if sink is not None:
                    sink.sent_upstream = True
            if body is not None and body.length != 0:
                if body.length is not None:
                    async for chunk in body:
                        await self._send_all(chunk)
                else:
                    async for chunk in body:
                        if chunk:
                            await self._send_all(encode_chunk(chunk))
                    await self._send_all(LAST_CHUNK)
        except OSError as exc:
            early = self._early_answer(method)
            if early is not None:
                # Answered before it read the whole request, then closed.
                self._give_back(False)
                return early
            self.close()
            if reused and (body is None or not body.consumed):
                raise StaleConnection() from exc
            raise BadGateway(f"upstream connection failed while sending: {exc}") from exc

        # A body already streamed cannot be sent again on a new connection.
        replayable = body is None or not body.consumed
        skip_body = method == "HEAD"
        parsed = self.parsed
        if parsed is None or parsed.skip_body:
            # A fresh parser the first time, and after a response to HEAD:
            # llhttp was told nothing of that one's missing body.
            parsed = self.parsed = ResponseParser(skip_body)
        else:
            parsed.reset(skip_body)
        received = 0
        try:
            while not parsed.headers_done:
                try:
                    data: bytes | None = self.sock.recv(READ_SIZE)
                except BlockingIOError:
                    data = await sockio.wait_recv(
                        self.sock, READ_SIZE, self.now() + read_timeout, self.watched
                    )
                if data is None:
                    self.close()
                    raise UpstreamTimeout(f"upstream sent no response within {read_timeout:g} s")
                if not data:
                    self.close()
                    if not received and reused and replayable:
                        raise StaleConnection()
                    raise BadGateway("upstream closed the connection before responding")
                received += len(data)
                parsed.parser.feed_data(data)
                if (
                    received > MAX_RESPONSE_HEAD_BYTES
                    and received - sum(map(len, parsed.body)) > MAX_RESPONSE_HEAD_BYTES
                ):
                    # The head's bytes: all fed so far but the body's (rare:
                    # counted only once past the bound).
                    self.close()
                    raise BadGateway("upstream response headers are too large")
        except httptools.HttpParserUpgrade:
            # llhttp stops at a complete 101 head with bytes after it (the
            # new protocol's); its head is in, and is refused just below.
            pass
        except httptools.HttpParserError as exc:
            self.close()
            raise BadGateway(f"upstream broke the HTTP protocol: {exc}") from exc
        except OSError as exc:
            self.close()
            if not received and reused and replayable:
                raise StaleConnection() from exc
            raise BadGateway(f"upstream connection failed: {exc}") from exc

        status = parsed.status
        if status == 101:
            # A protocol switch the gateway did not ask for.
            self.close()
            raise BadGateway("upstream switched protocols unasked")
        headers = Headers(parsed.headers)
        keep_alive = parsed.keep_alive
        if parsed.complete:
            content = b"".join(parsed.body)
            self._give_back(keep_alive)
            return Response(status, headers, content=content)
        length_raw = headers.get_raw(b"content-length")
        length = int(length_raw) if length_raw is not None and length_raw.isdigit() else None
        return Response(
            status,
            headers,
            body=Body(
                answer_body(self, parsed, read_timeout, keep_alive, generation),
                length,
                on_close=lambda: self._give_back(False, generation),
            ),
        )

    def _give_back(self, reusable: bool, generation: int | None = None) -> None:
        """Return the connection after an answer, once only, and only for
        the exchange that took it (``generation``): a late close of an old
        answer's body must not hand back a connection now serving another."""
        if generation is not None and generation != self.requests:
            return
        if not self.returned:
            self.returned = True
            self.pool.release(self, reusable=reusable)
