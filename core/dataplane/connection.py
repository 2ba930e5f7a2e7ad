"""One connection of the native proxy listener: HTTP/1.1 requests in,
answers out, in order.

The connection's task reads from the socket and feeds llhttp (h1parse.py);
the parser callbacks queue complete request heads (pipelined requests simply
wait in the queue: they are answered strictly in order) and the body chunks
of the current one. A request's body is a stream that reads more from the
socket only when the consumer (the upstream client) asks for it, so a slow
upstream slows the client down instead of filling memory.

Limits and timeouts, each answered the way clients expect:
* request line + headers over ``max_header_bytes``: 431, then close;
* a declared body over ``max_request_body_bytes``: 413 before reading it; a
  chunked body that grows past it: 413 (or a reset if the answer has begun);
* headers not complete within ``header_timeout_seconds`` (slowloris): 408,
  then close; an idle keep-alive connection: closed after
  ``idle_timeout_seconds``;
* a body whose next piece takes longer than ``body_timeout_seconds``, or
  that is not whole within ``body_deadline_seconds`` of the request's head:
  408 and close (the upstream's connection, fed half a body, is dropped);
* malformed requests (bad syntax, CR/LF injection, bad chunk sizes,
  Content-Length together with Transfer-Encoding, absolute-form targets,
  ``..`` segments, a missing Host, a request line without a version, i.e.
  HTTP/0.9): 400 and close. llhttp is strict about the syntax; the rest is
  checked here before anything reaches an upstream.

What the listener refuses by itself (400, 408, 413, 417, 431 before the
pipeline has the request) still gets its access-log line
(``Pipeline.log_refused``), so probing is visible.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import httptools
import trio

from triogate.dataplane import sockio
from triogate.dataplane.bodies import request_body
from triogate.dataplane.pipeline import new_request_id, problem_response
from triogate.dataplane.websocket import serve_upgrade
from triogate.errors import (
    BadRequest,
    ClientDisconnected,
    ExpectationFailed,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
)
from triogate.http import (
    Body,
    Headers,
    Request,
    Response,
    check_target,
    strip_connection_headers,
)
from triogate.http.h1frame import CHUNKED, LAST_CHUNK, Framing, encode_chunk
from triogate.http.h1parse import PendingRequest, RequestParser
from triogate.http.h1write import response_head

if TYPE_CHECKING:
    from triogate.dataplane.listener import ProxyListener

__all__ = ["Connection"]

log = logging.getLogger("triogate.dataplane.listener")

READ_SIZE: Final = 65536
DRAIN_LIMIT: Final = 65536  # unread request body we still drain to keep a connection


class Connection:
    """One client connection: its requests, one at a time, in order."""

    __slots__ = (
        "_continue_sent",
        "client_ip",
        "idle",
        "listener",
        "now",
        "parsed",
        "requests",
        "sock",
        "upgrade_rest",
        "waited",
        "watched",
    )

    def __init__(self, sock: socket.socket, peer: str, listener: ProxyListener) -> None:
        self.sock = sock
        self.waited = False
        self.client_ip = peer
        self.listener = listener
        cfg = listener.config
        self.parsed = RequestParser(cfg.max_header_bytes, cfg.max_request_body_bytes)
        self.requests = 0
        self.idle = False
        self._continue_sent = False
        self.upgrade_rest: bytes | None = None  # set when llhttp stops at an upgrade
        # The run's clock, bound once: ``trio.current_time()`` goes through
        # KI protection and three frames (~0.35 µs), the bound method one
        # (~0.1 µs), and an idle keep-alive wait reads it every request. A
        # connection lives in the run that accepted it.
        self.now = trio.lowlevel.current_clock().current_time
        self.watched = sockio.watched()  # the run's watchdog, found once

    async def _send_all(self, data: bytes | memoryview) -> None:
        # A client that stops reading for body_timeout_seconds is dropped.
        try:
            if await sockio.send_all(self.sock, data, self.listener.config.body_timeout_seconds):
                self.waited = True
        except (OSError, trio.ClosedResourceError) as exc:
            raise ClientDisconnected() from exc

    def _feed(self, data: bytes) -> None:
        try:
            self.parsed.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # What came after the upgrade's head: the new protocol's bytes.
            self.upgrade_rest = data[exc.args[0] :]
            raise BadRequest("protocol upgrades are not supported") from None
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, GatewayError):
                raise cause from None
            raise BadRequest(f"malformed request: {exc}") from None

    async def _recv(self, seconds: float, deadline: float) -> bytes:
        """More of a request body: within ``seconds`` of now (the per-read
        timeout) and before ``deadline`` (trio time, the whole body's).
        The clock is read only when the kernel has nothing yet."""
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError:
            self.waited = True
        except OSError as exc:
            raise ClientDisconnected() from exc
        now = self.now()
        if now >= deadline:
            raise RequestTimeout("the request body did not arrive within body_deadline_seconds")
        try:
            data = await sockio.wait_recv(
                self.sock, READ_SIZE, min(now + seconds, deadline), self.watched
            )
        except (OSError, trio.ClosedResourceError) as exc:
            raise ClientDisconnected() from exc
        if data is None:
            if self.now() >= deadline:
                raise RequestTimeout("the request body did not arrive within body_deadline_seconds")
            raise RequestTimeout("the client was too slow")
        return data

    async def next_request(self) -> PendingRequest | None:
        """The next request head, or None when the client is done with us.

        Idle between requests, the connection waits ``idle_timeout_seconds``
        (and shutdown may close it). Once a request's first byte is in, its
        whole head must arrive within ``header_timeout_seconds`` (a deadline
        for the block, not per read: slowloris) and within
        ``max_header_bytes`` (counted as received: llhttp reports a header
        only once its line ends, so one endless line would go unnoticed)."""
        parsed = self.parsed
        cfg = self.listener.config
        deadline: float | None = None  # set at the first wait mid-head
        received = 0
        while not parsed.ready:
            idle = parsed.current is None or parsed.current.complete
            if idle and self.listener.closing:
                return None
            try:
                data: bytes | None = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                # Park (inline: no coroutine of its own). Between requests
                # (nothing of this head read yet) shutdown may close an idle
                # connection, and it may idle idle_timeout_seconds; mid-head
                # the head's deadline counts from now, microseconds after its
                # first bytes (so the common one-read head reads no clock).
                self.waited = True
                if not received:
                    self.idle = True
                    wait_until = self.now() + cfg.idle_timeout_seconds
                else:
                    if deadline is None:
                        deadline = self.now() + cfg.header_timeout_seconds
                    wait_until = deadline
                try:
                    data = await sockio.wait_recv(self.sock, READ_SIZE, wait_until, self.watched)
                except trio.ClosedResourceError:
                    return None  # interrupted by shutdown
                except OSError as exc:
                    raise ClientDisconnected() from exc
                finally:
                    self.idle = False
                if data is None:
                    if not received:
                        return None  # idle too long
                    raise RequestTimeout("the request headers took too long") from None
            except OSError as exc:
                raise ClientDisconnected() from exc
            if not data:
                return None
            received += len(data)
            self._feed(data)
            if not parsed.ready and received > cfg.max_header_bytes + 1024:
                raise HeadersTooLarge("the request line and headers are too large")
        return parsed.ready.popleft()

    def _request(self, pending: PendingRequest) -> Request:
        if pending.error is not None:
            # The body already broke a limit while the head was parsed (a
            # chunked body over the cap in the same packet): refuse, never
            # forward what is left of it.
            raise pending.error
        path, query = check_target(pending.url, self.listener.config.allow_path_parameters)
        # Host, Content-Length, Transfer-Encoding and Expect as llhttp read
        # them, in one scan (keep-alive was read from llhttp already).
        length = pending.read_framing()
        headers = Headers(pending.headers)
        strip_connection_headers(headers, self.listener.config.underscores_in_headers)
        cap = self.listener.config.max_request_body_bytes
        if length is not None and length > cap:
            raise PayloadTooLarge(f"the request body is limited to {cap} bytes")
        expect = pending.expect
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise ExpectationFailed("only Expect: 100-continue is supported")
            pending.expect_continue = True
        self._continue_sent = False
        if pending.complete and not pending.chunks:
            body = Body(_NO_CHUNKS, length if length is not None else 0)
        else:
            # The whole body is due within body_deadline_seconds of now: a
            # client dripping bytes just inside body_timeout_seconds cannot
            # hold the upstream connection it is feeding for long.
            pending.body_deadline = self.now() + self.listener.config.body_deadline_seconds
            body = Body(request_body(self, pending), length)
        return Request(
            method=pending.method,
            path=path,
            query=query,
            headers=headers,
            body=body,
            client_ip=self.client_ip,
            http_version=pending.version,
        )

    async def serve(self) -> None:
        listener = self.listener
        while True:
            try:
                pending = await self.next_request()
            except GatewayError as exc:
                if self.upgrade_rest is not None:  # a WebSocket's, or refused there
                    await serve_upgrade(self, self.upgrade_rest)
                    return
                # Garbage, oversized or too-slow headers: answer and hang up
                # (logged as the request being read, if it got that far).
                current = self.parsed.current
                await self.send_error(exc, None if current is None or current.complete else current)
                return
            if pending is None:
                return
            self.requests += 1
            pipeline = listener.get_pipeline()
            listener.in_flight += 1
            try:
                # The exchange inline (not a coroutine of its own: each layer
                # costs its creation and a pass on every suspension).
                try:
                    request = self._request(pending)
                except GatewayError as exc:
                    await self.send_error(exc, pending)
                    return
                ctx, response = await pipeline.handle(request)
                try:
                    body_done = pending.complete and not pending.chunks
                    keep = pending.keep_alive and not listener.closing
                    if not body_done and keep:
                        keep = await self._drain(pending)
                    keep = await self._send_response(
                        response, pending.method, pending.version, keep
                    )
                finally:
                    logging_left = pipeline.finish(ctx, response)
                    if logging_left is not None:
                        await logging_left
            finally:
                listener.in_flight -= 1
            if not keep:
                return
            if not self.waited:
                # Served without ever parking (pipelined requests, instant
                # upstream): yield once, so no client can starve the others.
                await trio.lowlevel.checkpoint()
            self.waited = False

    async def _drain(self, pending: PendingRequest) -> bool:
        """The answer came before the request body was read (an early 401,
        say). Read and drop a small remainder to keep the connection; close
        on a big one, or when the client was told to wait (100-continue)."""
        if pending.expect_continue and not self._continue_sent:
            return False
        if pending.error is not None or pending.broken:
            return False
        try:
            while not pending.complete:
                pending.chunks.clear()
                if pending.body_bytes > DRAIN_LIMIT:
                    return False
                data = await self._recv(
                    self.listener.config.header_timeout_seconds, pending.body_deadline
                )
                if not data:
                    return False
                self._feed(data)
        except (GatewayError, ClientDisconnected):
            return False
        pending.chunks.clear()
        return True

    async def send_error(self, exc: GatewayError, pending: PendingRequest | None) -> None:
        """Refuse a request by the listener's own authority (the pipeline
        never saw it): answer, hang up, and give it its access-log line, so
        probing (garbage, oversized or slow heads) is visible."""
        response = problem_response(exc, new_request_id())
        method = pending.method if pending is not None and pending.head_done else "GET"
        with contextlib.suppress(ClientDisconnected):
            await self._send_response(response, method, "1.1", keep_alive=False)
        self.listener.get_pipeline().log_refused(
            method if pending is not None and pending.head_done else "-",
            pending.target() if pending is not None else "",
            self.client_ip,
            response,
        )

    async def _send_response(
        self, response: Response, method: str, version: str, keep_alive: bool
    ) -> bool:
        head, body, framing, keep_alive = response_head(response, method, version, keep_alive)
        data = b"".join(head)
        if body is None:
            if response.body is not None:
                await response.body.aclose()  # a HEAD, 204 or 304: nothing to send
            # Head and content in one write, inline when the kernel takes
            # it all (the common case): no coroutine for the write.
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise ClientDisconnected() from exc
            if sent < len(data):
                await self._send_all(memoryview(data)[sent:])
            return keep_alive
        try:
            await self._send_all(data)
            return await self._send_body(body, framing, keep_alive)
        finally:
            # Finished or not (the client went away, the body broke), the
            # upstream answer is closed now, not when the collector finds it;
            # closing a finished one does nothing.
            await body.aclose()

    async def _send_body(self, body: Body, framing: Framing, keep_alive: bool) -> bool:
        chunked = framing is CHUNKED
        try:
            sent = 0
            async for chunk in body:
                if not chunk:
                    continue
                sent += len(chunk)
                if chunked:
                    await self._send_all(encode_chunk(chunk))
                else:
                    await self._send_all(chunk)
            if chunked:
                await self._send_all(LAST_CHUNK)
            elif body.length is not None and sent != body.length:
                return False
        except GatewayError as exc:
            # The head is out: the only honest signal left is to cut the
            # connection, so the client sees a truncated response.
            log.warning("response body failed mid-stream: %s", exc.detail)
            return False
        return keep_alive


class _NoChunks:
    """The chunks of a request without a body: none. Stateless, so one
    object serves every such request (an async generator was made for each;
    most requests have no body)."""

    __slots__ = ()

    def __aiter__(self) -> _NoChunks:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


_NO_CHUNKS: AsyncIterator[bytes] = _NoChunks()
