"""The proxy listener on the wire: real gateway in-process (real LMDB), real
loopback sockets, a scripted h11 upstream that records what reaches it.

Most cases talk raw bytes over a trio socket and parse the answer with h11
(client side), because the interesting inputs are exactly the ones a normal
HTTP client refuses to produce. Every refused request is checked three ways:
the status, the problem+json ``code``, and that nothing reached the upstream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import h11
import msgspec
import pytest
import trio

from triogate.testing import (
    FakeResponse,
    FakeUpstream,
    Harness,
    RecordedRequest,
    harness_config,
    open_harness,
)

# Small caps and short timeouts so the limits are cheap to hit.
MAX_HEADER: Final = 4096
MAX_BODY: Final = 65536
SERVER: Final[dict[str, Any]] = {
    "max_header_bytes": MAX_HEADER,
    "max_request_body_bytes": MAX_BODY,
    "header_timeout_seconds": 2,
    "idle_timeout_seconds": 5,
    "body_timeout_seconds": 2,
}
PROBLEM_JSON: Final = "application/problem+json"
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
        "trailer",
    }
)
MB: Final = 1024 * 1024
CHUNK: Final = 65536
BIG_CHUNKS: Final = 1600  # 1600 x 64 KiB = 100 MiB


# ---- log watch ----------------------------------------------------------------


def _server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and r.name.startswith("triogate")
    ]


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No request in this file may leave an error (a traceback) in the log."""
    yield
    errors = _server_errors(caplog)
    assert not errors, f"the gateway logged errors: {errors}"


# ---- the gateway ----------------------------------------------------------------


@asynccontextmanager
async def gateway(
    tmp_path: Path,
    upstream: FakeUpstream | None = None,
    *,
    server: dict[str, Any] | None = None,
    plugins: dict[str, dict[str, Any]] | None = None,
    read_timeout: float | None = None,
    target: str | None = None,
) -> AsyncIterator[Harness]:
    """The real gateway in front of ``upstream`` (or of ``target``, a URL that
    may well be dead), with this file's small caps and timeouts."""
    upstream = upstream or FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        config = harness_config(
            tmp_path,
            target or upstream.url,
            plugins=plugins,
            server={**SERVER, **(server or {})},
        )
        if read_timeout is not None:
            up = msgspec.structs.replace(
                config.upstreams["test"], read_timeout_seconds=read_timeout
            )
            config = msgspec.structs.replace(config, upstreams={"test": up})
        # open_harness runs a spare fake upstream of its own; ours is the one
        # the config points at.
        async with open_harness(tmp_path, config=config, upstream=FakeUpstream()) as h:
            h.upstream = upstream
            yield h
        nursery.cancel_scope.cancel()


def proxy_port(h: Harness) -> int:
    port = urlsplit(h.info.proxy_url).port
    assert port is not None
    return port


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# ---- a raw HTTP/1.1 client ------------------------------------------------------


@dataclass
class WireResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        ctype = self.header("content-type") or ""
        assert ctype.startswith(PROBLEM_JSON), f"not a problem+json answer: {ctype!r} {self.body!r}"
        doc = self.json()
        assert doc["status"] == self.status
        assert doc["type"] == "about:blank"
        assert doc["request_id"]
        code: str = doc["code"]
        return code


class Wire:
    """Raw bytes out, h11-parsed responses in. h11 only needs to know the
    method of each request it reads a response to, so ``response()`` feeds
    it a stand-in request with that method."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.received = 0

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def try_send(self, data: bytes) -> bool:
        """Send unless the gateway has hung up already (False then)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return b""  # a reset is a close as far as these tests care
        self.received += len(data)
        return data

    def _stand_in(self, method: str) -> None:
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "wire")]))
            conn.send(h11.EndOfMessage())

    async def response(
        self, method: str = "GET", *, within: float = 5.0, interim_only: bool = False
    ) -> WireResponse:
        """The next response (1xx ones are collected in ``interim``; with
        ``interim_only`` the first 1xx is returned)."""
        self._stand_in(method)
        interim: list[int] = []
        head: h11.Response | None = None
        body = bytearray()
        with trio.fail_after(within):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self._receive())
                elif isinstance(event, h11.InformationalResponse):
                    interim.append(event.status_code)
                    if interim_only:
                        return WireResponse(event.status_code, _h(event.headers), b"", interim)
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    return WireResponse(head.status_code, _h(head.headers), bytes(body), interim)
                else:
                    raise AssertionError(f"unexpected h11 event {event!r}")

    async def response_or_close(
        self, method: str = "GET", *, within: float = 5.0
    ) -> WireResponse | None:
        """The next response, or None when the gateway closed (or reset) the
        connection without a byte of one. Fails when neither happens in time."""
        before = self.received
        try:
            return await self.response(method, within=within)
        except h11.RemoteProtocolError:
            if self.received == before:
                return None
            raise
        except trio.TooSlowError:
            raise AssertionError(f"no response and no close within {within:g} s") from None

    async def closed(self, within: float = 3.0) -> bool:
        """True when the gateway closes the connection in ``within`` seconds
        without sending anything more."""
        leftover, already = self.conn.trailing_data
        assert not leftover, f"unexpected bytes after the response: {bytes(leftover[:200])!r}"
        if already:
            return True
        with trio.move_on_after(within):
            data = await self._receive()
            assert data == b"", f"unexpected bytes after the response: {data[:200]!r}"
            return True
        return False


def _h(headers: Any) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]


@asynccontextmanager
async def wire(h: Harness) -> AsyncIterator[Wire]:
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port(h))
    async with stream:
        yield Wire(stream)


def get(path: str, *extra: str, host: str = "gw.example") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def echoed(r: WireResponse) -> dict[str, Any]:
    """The fake upstream's echo of the request, as the client got it."""
    assert r.status == 200, r.body[:300]
    doc: dict[str, Any] = r.json()
    return doc


async def settle() -> None:
    """Give anything that might still be on its way to the upstream a moment."""
    await trio.sleep(0.1)


def nothing_upstream(h: Harness) -> None:
    assert h.upstream.requests == [], [r.target for r in h.upstream.requests]
    assert h.upstream.connections == 0, "the gateway connected to the upstream"


# ---- upstream variants ------------------------------------------------------------


def pattern(i: int) -> bytes:
    return bytes([i % 251]) * CHUNK


class StreamingUpstream(FakeUpstream):
    """Counts and hashes request bodies instead of keeping them, and answers
    ``GET /download`` with ``BIG_CHUNKS`` generated chunks (never a list)."""

    def __init__(self) -> None:
        super().__init__(record_bodies=False)
        self.body_digests: list[str] = []
        self._digest = hashlib.sha256()

    def body_chunk(self, data: bytes) -> None:
        self._digest.update(data)

    def body_done(self) -> None:
        self.body_digests.append(self._digest.hexdigest())
        self._digest = hashlib.sha256()

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: RecordedRequest,
        answer: FakeResponse,
    ) -> None:
        if request.path != "/download":
            await super()._respond(conn, stream, request, answer)
            return
        head = h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
        await stream.send_all(conn.send(head))
        for i in range(BIG_CHUNKS):
            await stream.send_all(conn.send(h11.Data(data=pattern(i))))
        await stream.send_all(conn.send(h11.EndOfMessage()))


class SplitUpstream(FakeUpstream):
    """Sends the response head, pauses, then the body: the gateway reads the
    head alone and streams the body (so the connection is pooled after)."""

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: RecordedRequest,
        answer: FakeResponse,
    ) -> None:
        headers = [*answer.headers, ("content-length", str(len(answer.body)))]
        await stream.send_all(conn.send(h11.Response(status_code=answer.status, headers=headers)))
        await trio.sleep(0.05)
        if answer.body and request.method != "HEAD":
            await stream.send_all(conn.send(h11.Data(data=answer.body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


# ---- bad input: 4xx, close, nothing upstream ----------------------------------------

SMUGGLED: Final = b"GET /smuggled HTTP/1.1\r\nHost: gw.example\r\n\r\n"

BAD_REQUESTS: Final[list[tuple[str, bytes, int, str]]] = [
    ("tls-client-hello", b"\x16\x03\x01 hello\r\n\r\n", 400, "BAD_REQUEST"),
    ("garbage", b"GARBAGE\r\n\r\n", 400, "BAD_REQUEST"),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "BAD_REQUEST"),
    ("bad-version", b"GET /x HTTP/9.9\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("bare-lf-line-endings", b"GET /x HTTP/1.1\nHost: a\n\n", 400, "BAD_REQUEST"),
    (
        "bare-cr-in-value",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\rX-Evil: 1\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    (
        "bare-lf-in-value",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\nX-Evil: 1\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    ("obs-fold", b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\r\n X-Evil: 1\r\n\r\n", 400, "BAD_REQUEST"),
    ("nul-in-value", b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400, "BAD_REQUEST"),
    (
        "header-without-colon",
        b"GET /x HTTP/1.1\r\nHost: a\r\nNoColonHere\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    ("space-before-colon", b"GET /x HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400, "BAD_REQUEST"),
    (
        "non-token-header-name",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-\xff: b\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    (
        "invalid-chunk-size",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    (
        "negative-chunk-size",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    (
        "chunk-size-overflow",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    (
        "chunk-longer-than-declared",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    (
        "content-length-and-transfer-encoding",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    (
        "two-content-lengths",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
        "BAD_REQUEST",
    ),
    (
        "content-length-list",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
        400,
        "BAD_REQUEST",
    ),
    (
        "content-length-signed",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
        400,
        "BAD_REQUEST",
    ),
    (
        "connect",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        400,
        "BAD_REQUEST",
    ),
    ("absolute-form", b"GET http://evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("dotdot", b"GET /a/../admin HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("dotdot-at-end", b"GET /a/.. HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("dot", b"GET /a/./b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("pct-dotdot-lower", b"GET /a/%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("pct-dotdot-mixed", b"GET /a/%2E%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("pct-dotdot-half", b"GET /a/.%2E/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("backslash", b"GET /a\\..\\admin HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("pct-nul", b"GET /a%00b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("non-ascii-target", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("non-ascii-query", b"GET /x?q=\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400, "BAD_REQUEST"),
    ("missing-host", b"GET /x HTTP/1.1\r\nX-A: b\r\n\r\n", 400, "BAD_REQUEST"),
    ("two-hosts", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "BAD_REQUEST"),
    (
        "upgrade",
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        400,
        "INVALID_WEBSOCKET_HANDSHAKE",  # no Sec-WebSocket-Key (docs/websockets.md)
    ),
    (
        "unsupported-expect",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 200-ok\r\n\r\n",
        417,
        "EXPECTATION_FAILED",
    ),
    (
        "declared-body-over-cap",
        f"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode(),
        413,
        "PAYLOAD_TOO_LARGE",
    ),
    (
        "too-many-header-bytes",
        b"GET /x HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-Filler-%03d: %b\r\n" % (i, b"v" * 80) for i in range(60))
        + b"\r\n",
        431,
        "HEADERS_TOO_LARGE",
    ),
    (
        "request-line-too-long",
        b"GET /" + b"a" * (MAX_HEADER + 10) + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        431,
        "HEADERS_TOO_LARGE",
    ),
]


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [pytest.param(p, s, c, id=i) for i, p, s, c in BAD_REQUESTS],
)
async def test_bad_request_is_refused_and_never_forwarded(
    tmp_path: Path, payload: bytes, status: int, code: str
) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(payload)
        r = await w.response()
        assert r.status == status, r.body
        assert r.code == code
        assert r.header("connection") == "close"
        assert await w.closed(), "the connection stayed open after a refused request"
        await settle()
        nothing_upstream(h)


async def test_declared_body_over_cap_is_refused_before_the_body_is_sent(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        # Only the head: the answer must not wait for a body nobody will send.
        await w.send(
            f"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {50 * MB}\r\n\r\n".encode()
        )
        r = await w.response(within=1.5)
        assert r.status == 413
        assert r.code == "PAYLOAD_TOO_LARGE"
        assert await w.closed()
        await settle()
        nothing_upstream(h)


async def test_body_exactly_at_the_cap_is_accepted(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        body = b"b" * MAX_BODY
        await w.send(
            f"POST /at-cap HTTP/1.1\r\nHost: a\r\nContent-Length: {MAX_BODY}\r\n\r\n".encode()
            + body
        )
        r = await w.response()
        assert echoed(r)["body_bytes"] == MAX_BODY
        assert h.upstream.requests[0].body == body


async def test_chunked_body_growing_past_the_cap_never_reaches_upstream_complete(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(b"POST /grow HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%b\r\n" % (16384, b"g" * 16384)
        for _ in range(MAX_BODY // 16384 * 2):
            if not await w.try_send(piece):
                break
        await w.try_send(b"0\r\n\r\n")
        r = await w.response_or_close()
        if r is not None:
            assert r.status == 413
            assert r.code == "PAYLOAD_TOO_LARGE"
            assert await w.closed()
        await settle()
        # The head may have gone upstream (the body streams), but never a
        # complete request: the fake upstream records only complete ones.
        assert h.upstream.requests == []


async def test_invalid_chunk_mid_body_aborts_the_upstream_request(tmp_path: Path) -> None:
    """A broken chunk after the body began streaming: 400 at once (there is
    nothing left to drain: the framing is lost) and the upstream request is
    abandoned unfinished."""
    async with gateway(tmp_path, server={"header_timeout_seconds": 5}) as h, wire(h) as w:
        await w.send(b"POST /mid HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        await w.send(b"5\r\nhello\r\n")
        await trio.sleep(0.1)  # the head and first chunk are upstream by now
        await w.send(b"zz\r\nnope\r\n0\r\n\r\n")
        started = trio.current_time()
        r = await w.response(within=8)
        elapsed = trio.current_time() - started
        assert r.status == 400
        assert r.code == "BAD_REQUEST"
        assert elapsed < 1.5, f"the 400 took {elapsed:.1f} s"
        assert await w.closed()
        await settle()
        assert h.upstream.requests == []


async def test_stalled_body_times_out_promptly(tmp_path: Path) -> None:
    """A body that stops arriving: 408 after body_timeout_seconds (not after
    a further wait), and the upstream never gets a complete request."""
    server = {"header_timeout_seconds": 5, "body_timeout_seconds": 0.5}
    async with gateway(tmp_path, server=server) as h, wire(h) as w:
        await w.send(b"POST /stall HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        started = trio.current_time()
        r = await w.response_or_close(within=8)
        elapsed = trio.current_time() - started
        assert elapsed < 1.5, f"a stalled body held the connection {elapsed:.1f} s"
        if r is not None:
            assert r.status == 408
            assert r.code == "REQUEST_TIMEOUT"
        assert h.upstream.requests == []


async def test_header_line_over_cap_is_refused_without_waiting_for_its_end(
    tmp_path: Path,
) -> None:
    """One endless header line: the cap must apply to the bytes as they come,
    not only once the line is complete (or the header timeout is the only
    limit on what one connection makes the gateway buffer)."""
    async with (
        gateway(tmp_path, server={"header_timeout_seconds": 8}) as h,
        wire(h) as w,
        trio.open_nursery() as nursery,
    ):

        async def flood() -> None:
            await w.try_send(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: ")
            for _ in range(64):  # 4 MiB, no end of line
                if not await w.try_send(b"a" * CHUNK):
                    return

        nursery.start_soon(flood)
        r = await w.response_or_close(within=3)
        nursery.cancel_scope.cancel()
        if r is not None:
            assert r.status == 431, r.body
            assert r.code == "HEADERS_TOO_LARGE"
        nothing_upstream(h)


# ---- request smuggling ------------------------------------------------------------


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)


SMUGGLING: Final[list[tuple[str, bytes]]] = [
    (
        "CL.TE",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nContent-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n%b" % (5 + len(SMUGGLED), SMUGGLED),
    ),
    (
        "TE.CL",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n%b" % _chunked(SMUGGLED),
    ),
    (
        "CL.CL",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 0\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED),
    ),
    (
        "TE-chunked-identity",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked, identity\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED),
    ),
    (
        "TE-chunked-identity-no-CL",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
        b"%b" % _chunked(SMUGGLED),
    ),
    (
        "TE-xchunked",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: xchunked\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED),
    ),
    (
        "TE-xchunked-no-CL",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: xchunked\r\n\r\n"
        b"%b" % _chunked(SMUGGLED),
    ),
    (
        "TE-twice",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n%b" % _chunked(SMUGGLED),
    ),
    (
        "TE-obs-fold",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding:\r\n chunked\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED),
    ),
    (
        "TE-space-before-colon",
        b"POST /a HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding : chunked\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED),
    ),
]


@pytest.mark.parametrize(("payload"), [pytest.param(p, id=i) for i, p in SMUGGLING])
async def test_smuggling_attempt_is_refused_on_one_connection(
    tmp_path: Path, payload: bytes
) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(payload)
        r = await w.response()
        assert r.status == 400, r.body
        assert r.code == "BAD_REQUEST"
        assert await w.closed(), "a second response (or more bytes) followed the 400"
        await settle()
        assert all(req.path != "/smuggled" for req in h.upstream.requests)
        nothing_upstream(h)


async def test_body_of_an_early_answered_request_is_not_parsed_as_a_request(
    tmp_path: Path,
) -> None:
    """401 before the body is read: the body (which looks like a request) is
    drained as a body, and the connection serves the next real request."""
    async with gateway(tmp_path, plugins={"key-auth": {}}) as h, wire(h) as w:
        key = await h.create_key()
        await w.send(
            b"POST /a HTTP/1.1\r\nHost: gw.example\r\nContent-Length: %d\r\n\r\n%b"
            % (len(SMUGGLED), SMUGGLED)
        )
        r = await w.response()
        assert r.status == 401
        assert r.code == "MISSING_KEY"
        await w.send(get("/next", f"Authorization: Bearer {key}"))
        r2 = await w.response()
        assert echoed(r2)["target"] == "/next"
        await settle()
        assert [req.path for req in h.upstream.requests] == ["/next"]


# ---- connection management -----------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        for i in range(5):
            await w.send(get(f"/ka/{i}"))
            r = await w.response()
            assert echoed(r)["target"] == f"/ka/{i}"
            assert r.header("connection") != "close"
        # Bodies on the same connection: sized, then chunked.
        await w.send(b"POST /ka/sized HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        assert echoed(await w.response())["body_bytes"] == 5
        await w.send(
            b"POST /ka/chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        )
        assert echoed(await w.response())["body_bytes"] == 7
        assert [r.path for r in h.upstream.requests] == [
            *(f"/ka/{i}" for i in range(5)),
            "/ka/sized",
            "/ka/chunked",
        ]
        assert h.upstream.requests[-2].body == b"hello"
        assert h.upstream.requests[-1].body == b"abcdefg"


async def test_connection_close_from_the_client_is_honoured(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(get("/bye", "Connection: close"))
        r = await w.response()
        assert echoed(r)["target"] == "/bye"
        assert r.header("connection") == "close"
        assert await w.closed()
        assert "connection" not in dict(h.upstream.requests[0].headers)


async def test_http10_without_host_is_served_and_closed(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(b"GET /old HTTP/1.0\r\n\r\n")
        r = await w.response()
        assert echoed(r)["target"] == "/old"
        assert await w.closed()


async def test_http10_client_gets_a_streamed_body_close_delimited(tmp_path: Path) -> None:
    upstream = FakeUpstream([FakeResponse(200, chunks=[b"ab", b"cd", b"ef"])])
    async with gateway(tmp_path, upstream) as h, wire(h) as w:
        await w.send(b"GET /stream HTTP/1.0\r\n\r\n")
        r = await w.response()
        assert r.status == 200
        assert r.header("transfer-encoding") is None  # HTTP/1.0 knows no chunking
        assert r.body == b"abcdef"
        assert await w.closed()


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "trailers-later"])
async def test_chunked_trailers_do_not_become_upstream_headers(
    tmp_path: Path, one_write: bool
) -> None:
    """Trailer fields are not header fields (RFC 9110 §6.5.1): they must not
    turn into request headers upstream, whenever they happen to arrive."""
    head = b"POST /trailers HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    rest = b"4\r\nbody\r\n0\r\nX-Injected: trailer\r\nX-Key-ID: key_from_trailer\r\n\r\n"
    async with gateway(tmp_path) as h, wire(h) as w:
        if one_write:
            await w.send(head + rest)
        else:
            await w.send(head)
            await trio.sleep(0.1)
            await w.send(rest)
        r = await w.response()
        assert echoed(r)["body_bytes"] == 4
        (seen,) = h.upstream.requests
        assert seen.body == b"body"
        assert seen.header("x-injected") is None
        assert seen.header("x-key-id") is None
        # The connection is still in step.
        await w.send(get("/after-trailers"))
        assert echoed(await w.response())["target"] == "/after-trailers"


async def test_host_in_trailers_does_not_refuse_the_request(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(
            b"POST /trailer-host HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nbody\r\n0\r\nHost: evil.example\r\n\r\n"
        )
        r = await w.response()
        assert echoed(r)["body_bytes"] == 4
        (seen,) = h.upstream.requests
        assert [v for k, v in seen.headers if k == "host"] == [f"127.0.0.1:{h.upstream.port}"]
        assert seen.header("x-forwarded-host") == "a"


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(get("/one") + get("/two") + get("/three"))
        targets = [echoed(await w.response())["target"] for _ in range(3)]
        assert targets == ["/one", "/two", "/three"]
        assert [r.path for r in h.upstream.requests] == ["/one", "/two", "/three"]


async def test_pipelined_requests_with_bodies_keep_their_own_bodies(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(
            b"POST /p1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            + get("/p2")
            + b"POST /p3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nxy\r\n0\r\n\r\n"
        )
        docs = [echoed(await w.response()) for _ in range(3)]
        assert [d["target"] for d in docs] == ["/p1", "/p2", "/p3"]
        assert [d["body_bytes"] for d in docs] == [3, 0, 2]
        assert [r.body for r in h.upstream.requests] == [b"abc", b"", b"xy"]


async def test_head_returns_headers_only_and_keeps_the_connection(tmp_path: Path) -> None:
    upstream = FakeUpstream(
        [FakeResponse(200, [("content-length", "1234"), ("x-upstream", "head")])]
    )
    async with gateway(tmp_path, upstream) as h, wire(h) as w:
        await w.send(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n")
        r = await w.response("HEAD")
        assert r.status == 200
        assert r.header("content-length") == "1234"
        assert r.header("x-upstream") == "head"
        assert r.body == b""
        # No stray body bytes: the next response on the connection parses.
        await w.send(get("/after-head"))
        assert echoed(await w.response())["target"] == "/after-head"
        assert [(r.method, r.path) for r in h.upstream.requests] == [
            ("HEAD", "/h"),
            ("GET", "/after-head"),
        ]


async def test_expect_100_continue_then_body(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(
            b"POST /continue HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await w.response("POST", interim_only=True, within=3)
        assert interim.status == 100
        await w.send(b"hello world")
        r = await w.response("POST")
        assert echoed(r)["body_bytes"] == 11
        assert r.interim == []  # exactly one 100, already read
        (seen,) = h.upstream.requests
        assert seen.body == b"hello world"
        assert seen.header("expect") is None


async def test_expect_100_continue_refused_early_gets_no_continue(tmp_path: Path) -> None:
    async with gateway(tmp_path, plugins={"key-auth": {}}) as h, wire(h) as w:
        await w.send(
            b"POST /secret HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        r = await w.response("POST", within=3)
        assert r.interim == []
        assert r.status == 401
        assert r.code == "MISSING_KEY"
        await settle()
        nothing_upstream(h)


# ---- timeouts -----------------------------------------------------------------------------


async def test_slowloris_headers_are_cut_off_by_the_header_timeout(tmp_path: Path) -> None:
    server = {"header_timeout_seconds": 1, "idle_timeout_seconds": 10}
    async with gateway(tmp_path, server=server) as h, wire(h) as w:
        drip = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 200
        started = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def sender() -> None:
                for i in range(len(drip)):
                    if not await w.try_send(drip[i : i + 1]):
                        return
                    await trio.sleep(0.2)

            nursery.start_soon(sender)
            r = await w.response_or_close(within=4)
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
        assert elapsed < 2.5, f"headers dripping for {elapsed:.1f} s were not cut off"
        if r is not None:
            assert r.status == 408
            assert r.code == "REQUEST_TIMEOUT"
        nothing_upstream(h)


async def test_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    async with gateway(tmp_path, server={"idle_timeout_seconds": 0.5}) as h, wire(h) as w:
        await w.send(get("/idle"))
        assert echoed(await w.response())["target"] == "/idle"
        started = trio.current_time()
        assert await w.closed(within=3)
        elapsed = trio.current_time() - started
        assert 0.3 <= elapsed < 2.0, elapsed


async def test_client_gone_mid_body_is_not_an_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with gateway(tmp_path) as h:
        async with wire(h) as w:
            await w.send(b"POST /gone HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            await w.send(b"5\r\nhello\r\n")
            await trio.sleep(0.2)
        await trio.sleep(0.3)
        assert h.upstream.requests == []
        # The gateway still serves.
        r = await h.client.get("/still-up")
        assert r.status_code == 200
    errors = _server_errors(caplog)
    caplog.clear()
    assert not errors, f"a client hanging up was logged as an error: {errors}"


# ---- streaming -----------------------------------------------------------------------------


async def test_100mb_request_body_streams_with_flat_memory(tmp_path: Path) -> None:
    upstream = StreamingUpstream()
    async with gateway(
        tmp_path, upstream, server={"max_request_body_bytes": 200 * MB, "body_timeout_seconds": 10}
    ) as h:
        await h.client.post("/warm-up", content=b"x" * 1000)
        before = rss_bytes()
        peak = before
        expected = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            nonlocal peak
            for i in range(BIG_CHUNKS):
                chunk = pattern(i)
                expected.update(chunk)
                if i % 100 == 0:
                    peak = max(peak, rss_bytes())
                yield chunk

        with trio.fail_after(20):
            r = await h.client.post("/upload", content=body())
        peak = max(peak, rss_bytes())
        assert r.status_code == 200, r.text
        assert upstream.requests[-1].path == "/upload"
        assert upstream.body_sizes[-1] == BIG_CHUNKS * CHUNK
        assert upstream.body_digests[-1] == expected.hexdigest()
        grew = peak - before
        assert grew < 50 * MB, f"RSS grew by {grew / MB:.0f} MiB for a 100 MiB body"


async def test_100mb_response_streams_with_flat_memory(tmp_path: Path) -> None:
    upstream = StreamingUpstream()
    async with gateway(tmp_path, upstream) as h:
        await h.client.get("/warm-up")
        before = rss_bytes()
        peak = before
        got = 0
        digest = hashlib.sha256()
        with trio.fail_after(20):
            async with h.client.stream("GET", "/download") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    got += len(chunk)
                    digest.update(chunk)
                    if got % (4 * MB) < len(chunk):
                        peak = max(peak, rss_bytes())
        peak = max(peak, rss_bytes())
        expected = hashlib.sha256()
        for i in range(BIG_CHUNKS):
            expected.update(pattern(i))
        assert got == BIG_CHUNKS * CHUNK
        assert digest.hexdigest() == expected.hexdigest()
        grew = peak - before
        assert grew < 50 * MB, f"RSS grew by {grew / MB:.0f} MiB for a 100 MiB response"


# ---- upstream failures ----------------------------------------------------------------------


async def test_upstream_refusing_connections_is_502(tmp_path: Path) -> None:
    async with gateway(tmp_path, target=f"http://127.0.0.1:{closed_port()}") as h:
        r = await h.client.get("/nobody-home")
        assert r.status_code == 502
        assert r.headers["content-type"].startswith(PROBLEM_JSON)
        assert r.json()["code"] == "BAD_GATEWAY"


async def test_upstream_dropping_the_connection_is_502(tmp_path: Path) -> None:
    upstream = FakeUpstream([FakeResponse(drop=True)])
    async with gateway(tmp_path, upstream) as h:
        r = await h.client.get("/dropped")
        assert r.status_code == 502
        assert r.json()["code"] == "BAD_GATEWAY"
        assert [req.path for req in upstream.requests] == ["/dropped"]


async def test_post_is_not_retried_when_a_pooled_upstream_connection_drops(
    tmp_path: Path,
) -> None:
    """The upstream read the POST and then dropped the connection: it may
    have acted on it, so the gateway must not send it again (RFC 9110
    §9.2.2: a proxy MUST NOT retry non-idempotent requests)."""
    upstream = SplitUpstream()
    async with gateway(tmp_path, upstream) as h:
        warm = await h.client.get("/warm-up")
        assert warm.status_code == 200
        await trio.sleep(0.05)  # the upstream connection is back in the pool
        upstream.script.append(FakeResponse(drop=True))
        r = await h.client.post("/charge-card")
        assert [req.path for req in upstream.requests].count("/charge-card") == 1
        assert r.status_code == 502
        assert r.json()["code"] == "BAD_GATEWAY"


async def test_upstream_connection_is_reused_for_small_responses(tmp_path: Path) -> None:
    """A response that arrives whole in one read must still leave its
    keep-alive connection in the pool."""
    upstream = FakeUpstream(single_write=True)
    async with gateway(tmp_path, upstream) as h:
        for i in range(5):
            r = await h.client.get(f"/reuse/{i}")
            assert r.status_code == 200
        assert len(upstream.requests) == 5
        assert upstream.connections == 1, (
            f"{upstream.connections} upstream connections for 5 requests"
        )


async def test_slow_upstream_is_504(tmp_path: Path) -> None:
    upstream = FakeUpstream([FakeResponse(delay=2.0)])
    async with gateway(tmp_path, upstream, read_timeout=0.3) as h:
        started = trio.current_time()
        r = await h.client.get("/slow-upstream")
        elapsed = trio.current_time() - started
        assert r.status_code == 504
        assert r.json()["code"] == "UPSTREAM_TIMEOUT"
        assert elapsed < 1.5
        # The next request works (a fresh upstream connection).
        r2 = await h.client.get("/after-timeout")
        assert r2.status_code == 200


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
async def test_upstream_errors_pass_through_unchanged(tmp_path: Path, status: int) -> None:
    body = b'{"error": "upstream says no", "detail": "as is"}'
    headers = [
        ("content-type", "application/vnd.upstream+json"),
        ("x-upstream-trace", "t-42"),
        ("retry-after", "7"),
        ("cache-control", "no-store"),
    ]
    upstream = FakeUpstream([FakeResponse(status, headers, body)])
    async with gateway(tmp_path, upstream) as h, wire(h) as w:
        await w.send(get("/fails"))
        r = await w.response()
        assert r.status == status
        assert r.body == body
        for name, value in headers:
            assert r.header(name) == value
        assert r.header("content-length") == str(len(body))
        # And the connection is still good.
        await w.send(get("/fine"))
        assert echoed(await w.response())["target"] == "/fine"


# ---- what the upstream sees -------------------------------------------------------------------


async def test_forwarded_headers_and_hop_by_hop_removal(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(
            get(
                "/fwd/path?q=1&r=two",
                "X-Forwarded-For: 203.0.113.7",
                "X-Forwarded-Proto: https",
                "X-Forwarded-Host: forged.example",
                "X-Request-ID: req-abc.123:XYZ_9",
                "Connection: keep-alive, X-Hop-Secret",
                "X-Hop-Secret: only-for-the-next-hop",
                "Keep-Alive: timeout=5",
                "TE: trailers",
                "Trailer: X-Checksum",
                "Upgrade: h2c",
                "Proxy-Authorization: Basic Zm9vOmJhcg==",
                "Proxy-Connection: keep-alive",
                "X-Passes: yes",
                host="api.example.com",
            )
        )
        r = await w.response()
        assert r.status == 200
        (seen,) = h.upstream.requests
        names = [k for k, _ in seen.headers]
        assert seen.target == "/fwd/path?q=1&r=two"
        assert seen.header("host") == f"127.0.0.1:{h.upstream.port}"
        assert seen.header("x-forwarded-for") == "203.0.113.7, 127.0.0.1"
        assert seen.header("x-forwarded-proto") == "http"
        assert seen.header("x-forwarded-host") == "api.example.com"
        assert seen.header("x-request-id") == "req-abc.123:XYZ_9"
        for name in (
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
        ):
            assert names.count(name) == 1, (name, seen.headers)
        leaked = (HOP_BY_HOP | {"x-hop-secret"}) & set(names)
        assert not leaked, f"hop-by-hop headers reached the upstream: {leaked}"
        assert seen.header("x-passes") == "yes"


async def test_x_forwarded_for_is_set_when_the_client_sent_none(tmp_path: Path) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(get("/plain"))
        assert (await w.response()).status == 200
        (seen,) = h.upstream.requests
        assert seen.header("x-forwarded-for") == "127.0.0.1"
        assert seen.header("x-forwarded-host") == "gw.example"
        assert seen.header("x-request-id") is not None


async def test_x_forwarded_for_keeps_every_incoming_field_line(tmp_path: Path) -> None:
    """Two X-Forwarded-For lines are one list (RFC 9110 §5.3): appending to
    the first and dropping the second loses a hop of the chain."""
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(
            get("/xff", "X-Forwarded-For: 203.0.113.7", "X-Forwarded-For: 198.51.100.2, 10.0.0.1")
        )
        assert (await w.response()).status == 200
        (seen,) = h.upstream.requests
        values = [v for k, v in seen.headers if k == "x-forwarded-for"]
        assert values == ["203.0.113.7, 198.51.100.2, 10.0.0.1, 127.0.0.1"]


@pytest.mark.parametrize(
    "bad_id", ["has spaces in it", "a" * 129, "semi;colon", 'quote"d', "caf\xe9"]
)
async def test_invalid_request_id_is_replaced(tmp_path: Path, bad_id: str) -> None:
    async with gateway(tmp_path) as h, wire(h) as w:
        await w.send(get("/rid", f"X-Request-ID: {bad_id}"))
        assert (await w.response()).status == 200
        (seen,) = h.upstream.requests
        values = [v for k, v in seen.headers if k == "x-request-id"]
        assert len(values) == 1
        assert values[0] != bad_id
        assert len(values[0]) == 32
        int(values[0], 16)


async def test_key_auth_route_strips_the_key_and_replaces_x_key_id(tmp_path: Path) -> None:
    async with gateway(tmp_path, plugins={"key-auth": {}}) as h, wire(h) as w:
        key = await h.create_key()
        assert h.server.gateway is not None
        record, code, _ = h.server.gateway.keys.validate_nowait(key)
        assert record is not None and code is None
        await w.send(
            get(
                "/keyed",
                f"Authorization: Bearer {key}",
                f"X-API-Key: {key}",
                "X-Key-ID: key_forgedforgedforgedforged",
                "X-Key-ID: key_another_forgery",
            )
        )
        r = await w.response()
        assert r.status == 200, r.body
        (seen,) = h.upstream.requests
        assert seen.header("authorization") is None
        assert seen.header("x-api-key") is None
        assert [v for k, v in seen.headers if k == "x-key-id"] == [record.id]
        assert key not in json.dumps(seen.headers)


async def test_key_auth_route_without_key_reaches_nothing(tmp_path: Path) -> None:
    async with gateway(tmp_path, plugins={"key-auth": {}}) as h, wire(h) as w:
        await w.send(get("/keyed", "X-Key-ID: key_forgedforgedforgedforged"))
        r = await w.response()
        assert r.status == 401
        assert r.code == "MISSING_KEY"
        await w.send(get("/keyed", "X-API-Key: tg_not_a_real_key"))
        r2 = await w.response()
        assert r2.status == 401
        assert r2.code == "INVALID_KEY"
        await settle()
        nothing_upstream(h)
