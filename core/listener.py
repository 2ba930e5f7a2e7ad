"""The proxy listener: a purpose-built HTTP/1.1 server on trio and httptools.

Why not hypercorn here: measured on this kind of machine, hypercorn's trio
worker tops out near 2.4k req/s for a bare app, a trio server on the llhttp
parser near 20k. The data plane is the product's hot path, so it gets the
second; hypercorn still serves the admin API, and can serve this same
pipeline as an ASGI app (``triogate.asgi``) for HTTP/2 or TLS.

Theory of operation
-------------------
One task per connection, in the listener's nursery. The task reads from the
socket and feeds llhttp; the parser callbacks queue complete request heads
(pipelined requests simply wait in the queue: they are answered strictly in
order) and the body chunks of the current one. A request's body is a stream
that reads more from the socket only when the consumer (the upstream
client) asks for it, so a slow upstream slows the client down instead of
filling memory.

Limits and timeouts, each answered the way clients expect:
* request line + headers over ``max_header_bytes``: 431, then close;
* a declared body over ``max_request_body_bytes``: 413 before reading it; a
  chunked body that grows past it: 413 (or a reset if the answer has begun);
* headers not complete within ``header_timeout_seconds`` (slowloris): 408,
  then close; an idle keep-alive connection: closed after
  ``idle_timeout_seconds``;
* malformed requests (bad syntax, CR/LF injection, bad chunk sizes,
  Content-Length together with Transfer-Encoding, absolute-form targets,
  ``..`` segments, a missing Host): 400 and close. llhttp is strict about the
  syntax; the rest is checked here before anything reaches an upstream.

Shutdown: stop accepting, close idle connections at once, let in-flight
requests finish (answered with ``Connection: close``) until the grace
period ends, then cancel what is left.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any, Final

import httptools
import trio

from triogate import sockio
from triogate.config import ServerConfig
from triogate.errors import BadRequest, GatewayError, HeadersTooLarge, PayloadTooLarge
from triogate.http import (
    Body,
    ClientDisconnected,
    Headers,
    Request,
    Response,
    check_target,
    strip_connection_headers,
)
from triogate.pipeline import Pipeline, new_request_id, problem_response

__all__ = ["ProxyListener", "parse_listen"]

log = logging.getLogger("triogate.listener")

READ_SIZE: Final = 65536
DRAIN_LIMIT: Final = 65536  # unread request body we still drain to keep a connection

# accept() errors that concern one connection, not the listener (as trio
# treats them), and those that mean "out of resources, try again soon".
_ACCEPT_TRANSIENT: Final = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
_ACCEPT_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_REASONS: Final = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_STATUS_LINES: Final = {
    code: b"HTTP/1.1 %d %b\r\n" % (code, reason) for code, reason in _REASONS.items()
}
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


class RequestTimeout(GatewayError):
    status = 408
    code = "REQUEST_TIMEOUT"
    title = "Request Timeout"


class ExpectationFailed(GatewayError):
    status = 417
    code = "EXPECTATION_FAILED"
    title = "Expectation Failed"


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _Pending:
    """A request head off the wire, and its body as it arrives."""

    __slots__ = (
        "body_bytes",
        "broken",
        "chunks",
        "complete",
        "error",
        "expect_continue",
        "head_done",
        "headers",
        "keep_alive",
        "method",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.complete = False
        self.body_bytes = 0
        self.method = "GET"
        self.version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.head_done = False
        # The body stream failed (bad chunk, timeout, client gone): what is
        # left on the connection cannot be trusted, so it must close.
        self.broken = False
        self.error: GatewayError | None = None


class _Parser:
    """httptools callbacks: queue request heads, collect body chunks."""

    __slots__ = ("current", "header_bytes", "max_body", "max_header", "parser", "ready")

    def __init__(self, max_header: int, max_body: int) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.ready: collections.deque[_Pending] = collections.deque()
        self.current: _Pending | None = None
        self.max_header = max_header
        self.max_body = max_body
        self.header_bytes = 0

    def on_message_begin(self) -> None:
        self.current = _Pending()
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.max_header:
            raise HeadersTooLarge("the request line and headers are too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        if self.current.head_done:
            return  # a chunked body's trailer fields: never request headers
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.max_header:
            raise HeadersTooLarge("the request headers are too large")
        self.current.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        current = self.current
        assert current is not None
        parser = self.parser
        current.method = parser.get_method().decode("ascii")
        current.version = parser.get_http_version()
        current.keep_alive = parser.should_keep_alive()
        current.head_done = True
        self.ready.append(current)

    def on_body(self, body: bytes) -> None:
        current = self.current
        assert current is not None
        current.body_bytes += len(body)
        if current.body_bytes > self.max_body:
            current.error = PayloadTooLarge("the request body is too large")
            return
        current.chunks.append(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.complete = True


class _Connection:
    __slots__ = (
        "_continue_sent",
        "client_ip",
        "idle",
        "listener",
        "parsed",
        "requests",
        "sock",
        "waited",
    )

    def __init__(self, sock: socket.socket, client_ip: str, listener: ProxyListener) -> None:
        self.sock = sock
        self.waited = False
        self.client_ip = client_ip
        self.listener = listener
        cfg = listener.config
        self.parsed = _Parser(cfg.max_header_bytes, cfg.max_request_body_bytes)
        self.requests = 0
        self.idle = False
        self._continue_sent = False

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
        except httptools.HttpParserUpgrade:
            raise BadRequest("protocol upgrades are not supported") from None
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, GatewayError):
                raise cause from None
            raise BadRequest(f"malformed request: {exc}") from None

    async def _recv(self, seconds: float) -> bytes:
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError:
            self.waited = True
        except OSError as exc:
            raise ClientDisconnected() from exc
        try:
            data = await sockio.recv(self.sock, READ_SIZE, trio.current_time() + seconds)
        except (OSError, trio.ClosedResourceError) as exc:
            raise ClientDisconnected() from exc
        if data is None:
            raise RequestTimeout("the client was too slow")
        return data

    async def next_request(self) -> _Pending | None:
        """The next request head, or None when the client is done with us.

        Idle between requests, the connection waits ``idle_timeout_seconds``
        (and shutdown may close it). Once a request's first byte is in, its
        whole head must arrive within ``header_timeout_seconds`` (a deadline
        for the block, not per read: slowloris) and within
        ``max_header_bytes`` (counted as received: llhttp reports a header
        only once its line ends, so one endless line would go unnoticed)."""
        parsed = self.parsed
        cfg = self.listener.config
        deadline: float | None = None
        received = 0
        while not parsed.ready:
            idle = parsed.current is None or parsed.current.complete
            if idle and self.listener.closing:
                return None
            try:
                data: bytes | None = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                data = await self._wait_for_head(deadline)
                if data is None:
                    return None  # idle too long, or shutdown closed the connection
            except OSError as exc:
                raise ClientDisconnected() from exc
            if not data:
                return None
            if deadline is None:
                deadline = trio.current_time() + cfg.header_timeout_seconds
            received += len(data)
            self._feed(data)
            if not parsed.ready and received > cfg.max_header_bytes + 1024:
                raise HeadersTooLarge("the request line and headers are too large")
        return parsed.ready.popleft()

    async def _wait_for_head(self, deadline: float | None) -> bytes | None:
        """Park until bytes of a request head arrive. Idle (``deadline`` None):
        None after ``idle_timeout_seconds`` or when shutdown closes the
        connection. Mid-head: RequestTimeout at the head's deadline."""
        self.waited = True
        if deadline is None:
            self.idle = True  # shutdown may close an idle connection
            wait_until = trio.current_time() + self.listener.config.idle_timeout_seconds
        else:
            wait_until = deadline
        try:
            data = await sockio.recv(self.sock, READ_SIZE, wait_until)
        except trio.ClosedResourceError:
            return None  # interrupted by shutdown
        except OSError as exc:
            raise ClientDisconnected() from exc
        finally:
            self.idle = False
        if data is None and deadline is None:
            return None
        if data is None:
            raise RequestTimeout("the request headers took too long")
        return data

    async def _body(self, pending: _Pending) -> AsyncIterator[bytes]:
        try:
            if pending.expect_continue and not self._continue_sent:
                self._continue_sent = True
                await self._send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            while True:
                while pending.chunks:
                    yield pending.chunks.popleft()
                if pending.error is not None:
                    raise pending.error
                if pending.complete:
                    return
                data = await self._recv(self.listener.config.body_timeout_seconds)
                if not data:
                    raise ClientDisconnected()
                self._feed(data)
        except (GatewayError, ClientDisconnected):
            pending.broken = True
            raise

    def _request(self, pending: _Pending) -> Request:
        if pending.error is not None:
            # The body already broke a limit while the head was parsed (a
            # chunked body over the cap in the same packet): refuse, never
            # forward what is left of it.
            raise pending.error
        path, query = check_target(pending.url)
        headers = Headers(pending.headers)
        strip_connection_headers(headers)  # keep-alive was read from llhttp already
        hosts = [v for k, v in pending.headers if k == b"host"]
        if len(hosts) > 1 or (not hosts and pending.version == "1.1"):
            raise BadRequest("exactly one Host header is required")
        length: int | None = 0
        if headers.get_raw(b"transfer-encoding") is not None:
            length = None
        else:
            raw_length = headers.get_raw(b"content-length")
            if raw_length is not None:
                length = int(raw_length)  # llhttp has checked the syntax
        cap = self.listener.config.max_request_body_bytes
        if length is not None and length > cap:
            raise PayloadTooLarge(f"the request body is limited to {cap} bytes")
        expect = headers.get_raw(b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise ExpectationFailed("only Expect: 100-continue is supported")
            pending.expect_continue = True
        self._continue_sent = False
        if pending.complete and not pending.chunks:
            body = Body(_empty(), length if length is not None else 0)
        else:
            body = Body(self._body(pending), length)
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
                # Garbage, oversized or too-slow headers: answer and hang up.
                await self._send_error(exc, "GET")
                return
            if pending is None:
                return
            self.requests += 1
            pipeline = listener.get_pipeline()
            listener.in_flight += 1
            try:
                keep = await self._exchange(pending, pipeline)
            finally:
                listener.in_flight -= 1
            if not keep:
                return
            if not self.waited:
                # Served without ever parking (pipelined requests, instant
                # upstream): yield once, so no client can starve the others.
                await trio.lowlevel.checkpoint()
            self.waited = False

    async def _exchange(self, pending: _Pending, pipeline: Pipeline) -> bool:
        try:
            request = self._request(pending)
        except GatewayError as exc:
            await self._send_error(exc, pending.method)
            return False
        ctx, response = await pipeline.handle(request)
        try:
            body_done = pending.complete and not pending.chunks
            keep = pending.keep_alive and not self.listener.closing
            if not body_done and keep:
                keep = await self._drain(pending)
            keep = await self._send_response(response, pending.method, pending.version, keep)
        finally:
            await pipeline.after(ctx, response)
        return keep

    async def _drain(self, pending: _Pending) -> bool:
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
                data = await self._recv(self.listener.config.header_timeout_seconds)
                if not data:
                    return False
                self._feed(data)
        except (GatewayError, ClientDisconnected):
            return False
        pending.chunks.clear()
        return True

    async def _send_error(self, exc: GatewayError, method: str) -> None:
        response = problem_response(exc, new_request_id())
        with contextlib.suppress(ClientDisconnected):
            await self._send_response(response, method, "1.1", keep_alive=False)

    async def _send_response(
        self, response: Response, method: str, version: str, keep_alive: bool
    ) -> bool:
        status = response.status
        raw = response.headers.raw
        head = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
        head_request = method == "HEAD"
        for name, value in raw:
            if name in _FRAMING and not head_request:
                continue
            head.append(b"%b: %b\r\n" % (name, value))
        content = response.content
        body = response.body
        chunked = False
        if status in _NO_BODY_STATUSES or (100 <= status < 200):
            content, body = None, None
        elif head_request:
            if body is not None:
                await body.aclose()
            content, body = None, None
        elif body is None:
            head.append(b"content-length: %d\r\n" % len(content or b""))
        elif body.length is not None:
            head.append(b"content-length: %d\r\n" % body.length)
        elif version == "1.1":
            head.append(b"transfer-encoding: chunked\r\n")
            chunked = True
        else:
            keep_alive = False  # HTTP/1.0: the close ends the body
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if content:
            head.append(content)
        if body is None:
            await self._send_all(b"".join(head))
            return keep_alive
        try:
            await self._send_all(b"".join(head))
            return await self._send_body(body, chunked, keep_alive)
        finally:
            # Finished or not (the client went away, the body broke), the
            # upstream answer is closed now, not when the collector finds it;
            # closing a finished one does nothing.
            await body.aclose()

    async def _send_body(self, body: Body, chunked: bool, keep_alive: bool) -> bool:
        try:
            sent = 0
            async for chunk in body:
                if not chunk:
                    continue
                sent += len(chunk)
                if chunked:
                    await self._send_all(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    await self._send_all(chunk)
            if chunked:
                await self._send_all(b"0\r\n\r\n")
            elif body.length is not None and sent != body.length:
                return False
        except GatewayError as exc:
            # The head is out: the only honest signal left is to cut the
            # connection, so the client sees a truncated response.
            log.warning("response body failed mid-stream: %s", exc.detail)
            return False
        return keep_alive


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


class ProxyListener:
    """Accepts connections on ``proxy_listen`` and serves them with the
    current pipeline (``get_pipeline`` is called once per request, so a
    reload takes effect for the next request while in-flight ones finish on
    the config they started with)."""

    def __init__(
        self,
        config: ServerConfig,
        get_pipeline: Callable[[], Pipeline],
        *,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.get_pipeline = get_pipeline
        self.closing = False
        self.in_flight = 0
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self._address = ""
        self._accept_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return (
            f"<ProxyListener {self.address} {len(self.connections)} connections, "
            f"{self.in_flight} in flight{', closing' if self.closing else ''}>"
        )

    @property
    def address(self) -> str:
        return self._address or self.config.proxy_listen

    def statistics(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "connections": len(self.connections),
            "in_flight": self.in_flight,
            "accepted": self.accepted,
            "closing": self.closing,
        }

    def _bind(self) -> socket.socket:
        host, port = parse_listen(self.config.proxy_listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                # server.workers > 1: every worker binds the same port and
                # the kernel spreads new connections across them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept(self, sock: socket.socket) -> tuple[socket.socket, str]:
        while True:
            try:
                conn, addr = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    log.error("accept failed: %s; pausing", exc)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue  # that one connection failed: the next may not
                raise
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn.close()  # reset before we got to it
                continue
            return conn, str(addr[0])

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self._bind()
        host, port = listen.getsockname()[:2]
        self._address = f"{host}:{port}"
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(f"http://{self.address}")
                with trio.CancelScope() as self._accept_scope:
                    while True:
                        conn, client_ip = await self._accept(listen)
                        self.accepted += 1
                        nursery.start_soon(self._serve, conn, client_ip)
                # Refuse new connections at once (not leave them in the
                # backlog to be reset when the drain is over).
                sockio.close(listen)
                # Not accepting any more: in-flight requests finish (the
                # nursery waits for them) unless the grace period ends first.
        finally:
            sockio.close(listen)

    async def _serve(self, sock: socket.socket, client_ip: str) -> None:
        conn = _Connection(sock, client_ip, self)
        self.connections.add(conn)
        try:
            await conn.serve()
        except ClientDisconnected:
            pass
        except GatewayError as exc:
            await conn._send_error(exc, "GET")
        except Exception:
            log.exception("connection from %s failed", client_ip)
        finally:
            self.connections.discard(conn)
            sockio.close(sock)

    def shutdown(self) -> None:
        """Stop accepting; close idle connections; let in-flight ones finish."""
        self.closing = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for conn in list(self.connections):
            if conn.idle:
                sockio.interrupt(conn.sock)
