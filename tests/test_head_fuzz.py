"""Property-based fuzzing of the request-head path (hypothesis).

Generated request lines, header sets (CR/LF and NUL in values, obs-fold,
duplicate Content-Length, Transfer-Encoding with Content-Length, bare LF line
ends, underscores) and bodies (fixed, short, long, chunk streams with bad
sizes, extensions and trailers) go byte for byte to the real gateway's
native listener, which runs in a thread of its own in front of a strict h11
upstream. Whatever the bytes, the outcome must be one of:

* one or more 4xx answers from the gateway (problem+json), the last followed
  by the close of the connection;
* answers from the upstream, one per request the upstream received, every
  one of them well-framed (the upstream's h11 parser accepted it);
* a close without an answer (the input ended mid-message), with nothing
  complete at the upstream;

and never a 5xx, a malformed answer, a hang or an error (traceback) in the
gateway's log. Bounded: 150 examples, a few seconds.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import h11
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from triogate.config import LogConfig
from triogate.runtime.server import Server
from triogate.testing import FakeUpstream, RecordedRequest, harness_config

MAX_HEADER: Final = 4096
MAX_BODY: Final = 4096

# ---- the gateway, in a thread -------------------------------------------------------


class StrictUpstream(FakeUpstream):
    """The echo upstream, noting every request its h11 parser refused
    (except a body cut short: the client went away, which is allowed)."""

    def __init__(self) -> None:
        super().__init__()
        self.malformed: list[str] = []

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> RecordedRequest | None:
        try:
            return await super()._read_request(conn, stream)
        except h11.RemoteProtocolError as exc:
            if "complete message body" not in str(exc):
                self.malformed.append(str(exc))
            raise


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@dataclass
class Live:
    port: int
    upstream: StrictUpstream
    errors: ErrorLog


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        upstream = StrictUpstream()
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.run)
            config = harness_config(
                data_dir,
                upstream.url,
                server={
                    "max_header_bytes": MAX_HEADER,
                    "max_request_body_bytes": MAX_BODY,
                    "header_timeout_seconds": 2,
                    "body_timeout_seconds": 2,
                    "idle_timeout_seconds": 5,
                    "underscores_in_headers": False,
                },
                # Every path has a route: any 4xx is the gateway refusing
                # the request, not a path it does not know.
                routes=[
                    {"name": "root", "path": "/", "upstream": "test"},
                    {"name": "rest", "path": "/{rest:path}", "upstream": "test"},
                ],
            )
            # Access-log lines would only fill the test's output.
            config = msgspec.structs.replace(config, log=LogConfig(access_log=None))
            server = Server(config)
            info = await nursery.start(server.run)
            state.update(
                server=server,
                upstream=upstream,
                token=trio.lowlevel.current_trio_token(),
                port=int(info.proxy_url.rsplit(":", 1)[1]),
            )
            ready.set()
            await server.stopped.wait()
            nursery.cancel_scope.cancel()

    errors = ErrorLog()
    logger = logging.getLogger("triogate")
    logger.addHandler(errors)
    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the gateway did not start"
        yield Live(state["port"], state["upstream"], errors)
    finally:
        if "token" in state:
            trio.from_thread.run_sync(state["server"].shutdown, trio_token=state["token"])
        thread.join(20)
        logger.removeHandler(errors)
    assert not thread.is_alive(), "the gateway did not stop"
    assert not errors.records, errors.records
    assert not state["upstream"].malformed, state["upstream"].malformed


# ---- generated requests -----------------------------------------------------------------

CRLF: Final = b"\r\n"
_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PCHAR = "abcXYZ019-._~!$&'()*+,;=:@/"
# What one example breaks: nothing (a valid request) about as often as
# anything else, so the checks past the first refusal are reached too.
BREAKS: Final = [None] * 6 + [
    "method",
    "target",
    "version",
    "line-ends",
    "host",
    "header",
    "framing",
]
# Breaks that must be refused whatever else was drawn (the others may draw
# something valid: a random target can be a fine path).
ALWAYS_REFUSED: Final = frozenset({"method", "version", "line-ends", "host"})

good_methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])
bad_methods = st.sampled_from([b"CONNECT", b"PRI", b"get", b"G@T", b"", b"HEAD\x00"])
good_targets = st.tuples(
    st.text(alphabet=_PCHAR, max_size=16),
    st.sampled_from([b"", b"?q=1", b"?a=%20&b", b"%41", b"%2F"[:0]]),
).map(lambda t: b"/" + t[0].encode() + t[1])
bad_targets = st.one_of(
    st.sampled_from(
        [
            b"/a/../b",
            b"/a/%2e%2e/b",
            b"/%%32%65",
            b"/a%2fb",
            b"/a%zz",
            b"*",
            b"http://evil.example/x",
            b"/a#frag",
            b"/a\\b",
            b"/caf\xc3\xa9",
            b"/a%00",
            b"/a b",
        ]
    ),
    st.binary(min_size=1, max_size=16).map(lambda b: b"/" + b),
)
good_versions = st.sampled_from([b" HTTP/1.1", b" HTTP/1.1", b" HTTP/1.0"])
bad_versions = st.sampled_from(
    [b"", b" HTTP/0.9", b" HTTP/2.0", b" HTTP/1.1 ", b" http/1.1", b" HTTP/1.10"]
)
# Valid, but each one something a proxy must handle with care.
good_headers = st.one_of(
    st.tuples(
        st.text(alphabet=_TCHAR, min_size=1, max_size=12).map(lambda t: b"X-" + t.encode()),
        st.text(alphabet='abc 019;=,/"', max_size=12).map(lambda t: t.strip().encode()),
    ),
    st.sampled_from(
        [
            (b"X_Key_ID", b"key_victim"),
            (b"X-Key-ID", b"key_victim"),
            (b"X-Forwarded-For", b"10.9.8.7"),
            (b"Forwarded", b"for=10.9.8.7"),
            (b"X-Request-ID", b"mine-1"),
            (b"Connection", b"close"),
            (b"Connection", b"keep-alive, X-Drop"),
            (b"X-Drop", b"dropped"),
            (b"Te", b"trailers"),
            (b"Trailer", b"X-T"),
            (b"Expect", b"100-continue"),
        ]
    ),
)
bad_headers = st.tuples(
    st.sampled_from(
        [b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade", b"X-A"] * 2
        + [b"Content-Length ", b" Host", b"", b"X-\xff", b"X:Y", b"X\x00"]
    ),
    st.one_of(
        st.sampled_from(
            [
                b"chunked",
                b"gzip, chunked",
                b"0",
                b"-1",
                b"+3",
                b"3, 3",
                b"99999999999999999999",
                b"200-ok",
                b"websocket",
                b"a\rb",
                b"a\nb",
                b"a\x00b",
                b"a\r\n b",  # obs-fold
            ]
        ),
        st.binary(max_size=12),
    ),
)


@st.composite
def chunk_streams(draw: st.DrawFn, broken: bool) -> bytes:
    """A chunked body, with a broken part when ``broken``."""
    out = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=12), max_size=3)):
        size, ext, end = b"%x" % len(data), draw(st.sampled_from([b"", b";a=b"])), CRLF
        if broken:
            size = draw(st.sampled_from([size, b"%x" % (len(data) + 1), b"zz", b"-1", b""]))
            ext = draw(st.sampled_from([b"", b" ;a", b";\x00", b";a=\r"]))
            end = draw(st.sampled_from([CRLF, b"\n", b"", b"X\r\n"]))
        out += size + ext + CRLF + data + end
    trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
    if broken:
        trailer = draw(st.sampled_from([b"", b"Content-Length: 3\r\n", b"bad\r\n", b"X: \x00\r\n"]))
    if not broken or draw(st.booleans()):
        out += b"0" + CRLF + trailer + CRLF
    return out


SMUGGLED: Final = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
BAD_FRAMING: Final = [
    ([(b"Content-Length", b"4"), (b"Transfer-Encoding", b"chunked")], b"0\r\n\r\n" + SMUGGLED),
    ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"4")], b"0\r\n\r\n" + SMUGGLED),
    ([(b"Content-Length", b"0"), (b"Content-Length", b"38")], SMUGGLED),
    ([(b"Transfer-Encoding", b"chunked, identity")], b"0\r\n\r\n" + SMUGGLED),
    ([(b"Transfer-Encoding", b"identity")], b"abc"),
    ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], b"0\r\n\r\n"),
]


@st.composite
def framed(draw: st.DrawFn, broken: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Framing headers and a body: consistent, or (``broken``) not."""
    kind = draw(st.sampled_from(["none", "length", "chunked", "pipelined"]))
    if broken:
        if kind == "length":
            body = draw(st.binary(max_size=24))
            wrong = draw(st.integers(0, 40).filter(lambda n: n != len(body)))
            return [(b"Content-Length", b"%d" % wrong)], body
        if kind == "chunked":
            return [(b"Transfer-Encoding", b"chunked")], draw(chunk_streams(True))
        return draw(st.sampled_from(BAD_FRAMING))
    if kind == "none":
        return [], b""
    if kind == "length":
        body = draw(st.binary(max_size=24))
        return [(b"Content-Length", b"%d" % len(body))], body
    if kind == "chunked":
        return [(b"Transfer-Encoding", b"chunked")], draw(chunk_streams(False))
    return [(b"Content-Length", b"0")], SMUGGLED  # two requests, one after the other


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Bytes of a request (and whatever follows it), and whether the first
    request in them must be refused."""
    breaks = draw(st.sampled_from(BREAKS))
    method = draw(bad_methods if breaks == "method" else good_methods)
    target = draw(bad_targets if breaks == "target" else good_targets)
    version = draw(bad_versions if breaks == "version" else good_versions)
    fields = [] if breaks == "host" else [(b"Host", b"gw.example")]
    framing, body = draw(framed(breaks == "framing"))
    fields += framing
    fields += draw(st.lists(good_headers, max_size=3))
    if breaks == "header":
        fields.append(draw(bad_headers))
    order = draw(st.permutations(range(len(fields))))
    sep = draw(st.sampled_from([b" ", b" ", b"", b"  ", b"\t"]))  # OWS: all valid
    eol = b"\n" if breaks == "line-ends" else CRLF
    head = [method + b" " + target + version]
    head += [fields[i][0] + b":" + sep + fields[i][1] for i in order]
    # HTTP/1.0 needs no Host.
    refused = breaks in ALWAYS_REFUSED and not (breaks == "host" and version == b" HTTP/1.0")
    return eol.join(head) + eol + eol + body, refused


# ---- one exchange ---------------------------------------------------------------------------


def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data``, half-close, read until the gateway closes. Returns
    what came back and whether the connection ended with a reset."""
    reset = False
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            reset = True  # the gateway hung up already: read what it said
        for _ in range(10_000):  # bounded: a closed connection ends it long before
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            except TimeoutError:
                raise AssertionError(f"the gateway neither answered nor closed: {data!r}") from None
            if not piece:
                break
            received += piece
    return received, reset


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse what came back as a series of HTTP/1.1 responses (to GETs: no
    HEAD is generated); any malformed framing fails the test."""
    conn = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], bytes]] = []
    if not raw:
        return out  # closed without a word
    conn.receive_data(raw)
    conn.receive_data(b"")
    while True:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        status = 0
        fields: dict[str, str] = {}
        body = b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                # The close came after a 100 Continue (the client gave up
                # on its body): no answer, which is what the caller checks.
                assert status == 0, f"a malformed answer: {raw!r}"
                return out
            if isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                assert status == 0, f"an answer cut short: {raw!r}"
                return out
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                fields = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, fields, body))
                rest = conn.trailing_data[0]
                if conn.their_state is h11.MUST_CLOSE:
                    assert not rest, f"bytes after a closing answer: {raw!r}"
                if not rest:
                    return out
                break


# ---- the property ---------------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=requests())
def test_any_request_head_is_refused_cleanly_or_forwarded_well_framed(
    live: Live, case: tuple[bytes, bool]
) -> None:
    data, must_refuse = case
    upstream = live.upstream
    before = len(upstream.requests)
    raw, reset = exchange(live.port, data)
    got = responses(raw)
    forwarded = upstream.requests[before:]

    statuses = [status for status, _, _ in got]
    event(f"answers {sorted(set(statuses))}, {len(forwarded)} forwarded")
    assert all(s < 500 for s in statuses), f"a 5xx for {data!r}: {got}"
    refused = [s for s in statuses if s >= 400]
    if refused:
        # The gateway's refusal is its last word, problem+json, then the close.
        status, fields, body = got[-1]
        assert 400 <= status < 500
        assert fields.get("content-type", "").startswith("application/problem+json"), got
        assert fields.get("connection") == "close", got
        assert b'"code":' in body
        assert all(s < 400 for s in statuses[:-1]), got
    # Every upstream answer (the echo, 200) stands for exactly one request the
    # upstream received whole; a refusal forwards nothing of its own.
    answered = [s for s in statuses if s == 200]
    assert len(answered) == len(forwarded), (data, got, forwarded)
    for _, fields, body in got:
        if fields.get("content-type") == "application/json":
            assert b'"method"' in body
    if not got:
        assert not forwarded, (data, forwarded)
    if must_refuse:
        assert got and got[0][0] in (400, 431), (data, got)
        assert not forwarded, (data, forwarded)
    assert not upstream.malformed, (data, upstream.malformed)
    assert not live.errors.records, (data, live.errors.records)
    del reset  # a reset after a complete answer is a close, as far as clients care
