"""The floor: the smallest honest reverse proxy on trio + httptools.

Why it exists: it is the floor of what any gateway written on trio +
httptools can do on this machine. ``python -m benchmarks proxy`` loads it
next to nginx and triogate, so a reader sees how much of triogate's cost per
request is the language and runtime (CPython, trio's scheduler, httptools,
the system calls; all of them paid here too) and how much is triogate's own
(routing, plugins, header handling, timeouts, logging, limits).

What it does, and nothing more:

* non-blocking stdlib sockets: every operation tries the system call first
  and parks the task (``trio.lowlevel.wait_readable`` / ``wait_writable``)
  only on EAGAIN; a request served without ever parking is followed by one
  ``trio.lowlevel.checkpoint()``, so one busy client cannot starve the others
  (the same rule triogate's listener follows);
* httptools parsers for the requests (pipelined ones too, answered in order)
  and for the upstream's responses;
* one keep-alive upstream connection per client connection, opened on the
  first request, opened again when the upstream closed it (a request that
  met a reused connection closed under it is retried once on a new one);
* no routing, no plugins, no header processing beyond dropping
  ``connection`` and re-framing both directions with ``content-length``
  (``transfer-encoding`` and the old ``content-length`` go: bodies are
  buffered whole, then sent with their length).

What it leaves out, on purpose: timeouts, limits on head and body sizes,
``Expect: 100-continue``, upgrades (answered 501), responses to HEAD on a
kept-alive upstream connection (the connection is closed after one),
responses framed by the upstream closing the connection (answered 502), and
any logging. A gateway cannot do less per request and still proxy HTTP/1.1.

Run it as ``python -m benchmarks.bare_proxy --listen 127.0.0.1:8080
--upstream 127.0.0.1:8081``; it prints ``bare_proxy: listening on
http://HOST:PORT`` once it accepts connections, and runs until SIGTERM or
Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
import sys
from collections import deque
from dataclasses import dataclass

import httptools
import trio

__all__ = ["main", "serve"]

RECV_SIZE = 65536
_CONNECTION = b"connection"
_REFRAMED = frozenset({_CONNECTION, b"content-length", b"transfer-encoding"})
_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})


class UpstreamFailed(Exception):
    """The upstream could not be reached or answered something unusable."""


# --- socket I/O: the system call first, trio's wait only on EAGAIN ------------


class Waited:
    """Set when an operation had to park the task (it went through trio's
    scheduler, so no extra checkpoint is due)."""

    __slots__ = ("flag",)

    def __init__(self) -> None:
        self.flag = False


async def recv(sock: socket.socket, waited: Waited) -> bytes:
    while True:
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            waited.flag = True
            await trio.lowlevel.wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes, waited: Waited) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            waited.flag = True
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def connect(address: tuple[str, int], waited: Waited) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code in (errno.EINPROGRESS, errno.EAGAIN):
            waited.flag = True
            await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, errno.errorcode.get(code, "connect failed"))
    except BaseException:
        sock.close()
        raise
    return sock


def close(sock: socket.socket) -> None:
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


# --- parsing --------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    http_10: bool


class RequestReader:
    """httptools callbacks for the client's side: completed requests queue up
    in ``ready`` (more than one when the client pipelines)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[Request] = deque()
        self._target: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self._target = []
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._target.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        self.ready.append(
            Request(
                parser.get_method(),
                b"".join(self._target),
                self._headers,
                b"".join(self._body),
                parser.should_keep_alive(),
                parser.get_http_version() == "1.0",
            )
        )


class ResponseReader:
    """httptools callbacks for one upstream response."""

    def __init__(self, head_request: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.reason: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False
        self.keep_alive = False  # read when complete: the parser forgets it after

    def on_status(self, status: bytes) -> None:
        self.reason.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.head_request:  # no body follows, whatever content-length says
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True


# --- one client connection --------------------------------------------------------


class Connection:
    def __init__(self, client: socket.socket, upstream: tuple[str, int]) -> None:
        self.client = client
        self.upstream_address = upstream
        self.upstream: socket.socket | None = None
        self.reader = RequestReader()
        self.waited = Waited()

    def _drop_upstream(self) -> None:
        if self.upstream is not None:
            close(self.upstream)
            self.upstream = None

    async def serve(self) -> None:
        reader = self.reader
        try:
            while True:
                while not reader.ready:
                    data = await recv(self.client, self.waited)
                    if not data:
                        return
                    try:
                        reader.parser.feed_data(data)
                    except httptools.HttpParserUpgrade:
                        await self._error(501, b"upgrades are not supported")
                        return
                    except httptools.HttpParserError:
                        await self._error(400, b"malformed request")
                        return
                request = reader.ready.popleft()
                try:
                    answer, upstream_keep_alive = await self._exchange(request)
                except (OSError, UpstreamFailed):
                    self._drop_upstream()
                    await self._error(502, b"the upstream failed")
                    return
                if not upstream_keep_alive:
                    self._drop_upstream()
                await send_all(self.client, answer, self.waited)
                if not request.keep_alive:
                    return
                if not self.waited.flag:
                    await trio.lowlevel.checkpoint()
                self.waited.flag = False
        finally:
            self._drop_upstream()

    async def _exchange(self, request: Request) -> tuple[bytes, bool]:
        """Send the request upstream, read the answer; the bytes for the
        client and whether the upstream connection can be kept."""
        body = request.body
        parts = [request.method, b" ", request.target, b" HTTP/1.1\r\n"]
        for name, value in request.headers:
            if name.lower() not in _REFRAMED:
                parts += (name, b": ", value, b"\r\n")
        if body or request.method not in _NO_BODY_METHODS:
            parts += (b"content-length: ", str(len(body)).encode("ascii"), b"\r\n")
        parts += (b"\r\n", body)
        outgoing = b"".join(parts)

        reused = self.upstream is not None
        response = await self._round_trip(outgoing, request.method == b"HEAD")
        if response is None and reused and request.method in _IDEMPOTENT:
            # The kept-alive connection was closed under us before any
            # answer: once more on a new one.
            response = await self._round_trip(outgoing, request.method == b"HEAD")
        if response is None:
            raise UpstreamFailed("the upstream closed the connection without an answer")

        answer_body = b"".join(response.body)
        status = response.parser.get_status_code()
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, b"".join(response.reason))]
        if request.method == b"HEAD":
            # No body to measure: the upstream's framing headers describe the
            # body a GET would have had, and stay.
            parts += [b"%s: %s\r\n" % h for h in response.headers if h[0].lower() != _CONNECTION]
        else:
            for name, value in response.headers:
                if name.lower() not in _REFRAMED:
                    parts += (name, b": ", value, b"\r\n")
            if status not in (204, 304):
                parts += (b"content-length: ", str(len(answer_body)).encode("ascii"), b"\r\n")
        if not request.keep_alive:
            parts.append(b"connection: close\r\n")
        elif request.http_10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if request.method != b"HEAD":
            parts.append(answer_body)
        keep = response.keep_alive and request.method != b"HEAD"
        return b"".join(parts), keep

    async def _round_trip(self, outgoing: bytes, head_request: bool) -> ResponseReader | None:
        """One request and its response on the upstream connection (opened if
        there is none); None if it closed before a byte of the answer."""
        if self.upstream is None:
            self.upstream = await connect(self.upstream_address, self.waited)
        sock = self.upstream
        response = ResponseReader(head_request)
        received = False
        try:
            await send_all(sock, outgoing, self.waited)
            while not response.complete:
                data = await recv(sock, self.waited)
                if not data:
                    break
                received = True
                response.parser.feed_data(data)
        except (ConnectionResetError, BrokenPipeError):
            if received:
                raise
        except httptools.HttpParserError as exc:
            raise UpstreamFailed(f"unreadable answer: {exc}") from None
        if response.complete:
            return response
        self._drop_upstream()
        if received:
            raise UpstreamFailed("the upstream closed the connection mid-answer")
        return None

    async def _error(self, status: int, detail: bytes) -> None:
        reason = {400: b"Bad Request", 501: b"Not Implemented", 502: b"Bad Gateway"}[status]
        body = detail + b"\n"
        head = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\n" % (status, reason)
        head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        with trio.move_on_after(1), contextlib.suppress(OSError):
            await send_all(self.client, head + body, self.waited)


# --- the server ----------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _bind(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve_one(client: socket.socket, upstream: tuple[str, int]) -> None:
    try:
        await Connection(client, upstream).serve()
    except OSError:
        pass  # the client went away (reset, broken pipe): nothing to tell
    finally:
        close(client)


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    sock = _bind(listen)
    try:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"bare_proxy: listening on http://{shown}:{port}", flush=True)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    client, _ = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(_serve_one, client, upstream)
    finally:
        close(sock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bare_proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT (port 0: any)")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    try:
        trio.run(serve, args.listen, args.upstream)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
