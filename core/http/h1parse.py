"""Reading HTTP/1.1 requests off the wire: llhttp (httptools) callbacks that
queue complete request heads and collect the current request's body chunks.

Sans-IO: ``RequestParser.parser.feed_data(bytes)`` runs the callbacks below
and nothing here touches a socket. The listener (listener.py) owns the
socket, the timeouts and the answers. A callback that refuses something
raises a GatewayError; llhttp turns it into an HttpParserCallbackError whose
``__context__`` the listener re-raises, so the client gets that error's
status and code rather than a generic 400.
"""

from __future__ import annotations

import collections
from typing import Final

import httptools

from triogate.errors import BadRequest, GatewayError, HeadersTooLarge, PayloadTooLarge

__all__ = ["PendingRequest", "RequestParser"]

# What llhttp reports for a request line it accepts; "0.9" is its answer to
# a line without a version (``GET /path``), which is refused.
SUPPORTED_VERSIONS: Final = frozenset({"1.0", "1.1"})


class PendingRequest:
    """A request head off the wire, and its body as it arrives."""

    __slots__ = (
        "body_bytes",
        "body_deadline",
        "broken",
        "chunks",
        "complete",
        "error",
        "expect",
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
        self.expect: bytes | None = None
        self.expect_continue = False
        self.head_done = False
        # The body stream failed (bad chunk, timeout, client gone): what is
        # left on the connection cannot be trusted, so it must close.
        self.broken = False
        self.error: GatewayError | None = None
        # trio time by which the whole body must be in (body_deadline_seconds,
        # set when the listener starts handling the request).
        self.body_deadline = 0.0

    def target(self) -> str:
        """The request target as received, for the access log (bounded)."""
        return self.url[:1024].decode("latin-1")

    def read_framing(self) -> int | None:
        """The head's framing, from one scan of its headers as llhttp framed
        the body (before hop-by-hop headers are removed): the body's
        declared length (0 without one, None when chunked); its ``Expect``
        value is left in ``expect``. BadRequest unless there is exactly one
        ``Host`` (an HTTP/1.0 request may have none)."""
        hosts = 0
        chunked = False
        raw_length = expect = None
        for name, value in self.headers:
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                raw_length = value  # llhttp refuses a second one
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect" and expect is None:
                expect = value
        if hosts > 1 or (not hosts and self.version == "1.1"):
            raise BadRequest("exactly one Host header is required")
        self.expect = expect
        if chunked:
            return None
        # llhttp has checked the syntax (and refused Content-Length with chunked).
        return 0 if raw_length is None else int(raw_length)


class RequestParser:
    """httptools callbacks: queue request heads, collect body chunks."""

    __slots__ = ("current", "header_bytes", "max_body", "max_header", "parser", "ready")

    def __init__(self, max_header: int, max_body: int) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.ready: collections.deque[PendingRequest] = collections.deque()
        self.current: PendingRequest | None = None
        self.max_header = max_header
        self.max_body = max_body
        self.header_bytes = 0

    def on_message_begin(self) -> None:
        self.current = PendingRequest()
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
        if current.version not in SUPPORTED_VERSIONS:
            # HTTP/0.9 (a request line without a version) has no headers and
            # no framing: forwarding it as HTTP/1.1 would invent both.
            raise BadRequest("the request line must end with HTTP/1.0 or HTTP/1.1")
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
