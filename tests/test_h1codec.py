"""The HTTP/1.1 codec without I/O (``triogate.http``): bytes in, decisions
and bytes out.

* framing decisions (``h1frame``): one table for every door, and both front
  doors (the native listener's ``response_head`` and the ASGI adapter's
  messages) checked against it for 1xx, 204, 304 and HEAD;
* chunk encoding, read back by llhttp;
* the upstream request head (``h1client.proxy_request_head``) and the
  gateway's own (``request_head``), byte for byte;
* the upstream response parser glue (``h1client.ResponseParser``);
* the request head's framing as llhttp read it (``h1parse``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httptools
import pytest

from triogate.dataplane.asgi import GatewayASGI
from triogate.errors import BadRequest
from triogate.http import Body, Headers, Response
from triogate.http.h1client import (
    NOT_FORWARDED,
    ResponseParser,
    proxy_request_head,
    request_head,
)
from triogate.http.h1frame import (
    CHUNKED,
    CLOSE_DELIMITED,
    CONTENT_LENGTH,
    LAST_CHUNK,
    NO_BODY,
    Framing,
    encode_chunk,
    request_framing,
    response_framing,
)
from triogate.http.h1parse import PendingRequest, RequestParser
from triogate.http.h1write import http_date, response_head

# ---- framing decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "method", "version", "length", "framing"),
    [
        (200, "GET", "1.1", 5, CONTENT_LENGTH),
        (200, "GET", "1.1", 0, CONTENT_LENGTH),
        (200, "GET", "1.1", None, CHUNKED),
        (200, "GET", "1.0", None, CLOSE_DELIMITED),
        (200, "GET", "1.0", 5, CONTENT_LENGTH),
        (404, "POST", "1.1", None, CHUNKED),
        (200, "HEAD", "1.1", 5, NO_BODY),
        (200, "HEAD", "1.0", None, NO_BODY),
        (100, "GET", "1.1", 5, NO_BODY),
        (103, "GET", "1.1", None, NO_BODY),
        (204, "GET", "1.1", 5, NO_BODY),
        (204, "DELETE", "1.0", None, NO_BODY),
        (304, "GET", "1.1", 5, NO_BODY),
        (304, "GET", "1.1", None, NO_BODY),
        (205, "GET", "1.1", 0, CONTENT_LENGTH),
    ],
)
def test_response_framing_table(
    status: int, method: str, version: str, length: int | None, framing: Framing
) -> None:
    assert response_framing(status, method, version, length) is framing


@pytest.mark.parametrize(
    ("method", "length", "framing"),
    [
        ("GET", 0, NO_BODY),
        ("DELETE", 0, NO_BODY),
        ("POST", 0, CONTENT_LENGTH),
        ("PUT", 0, CONTENT_LENGTH),
        ("PATCH", 0, CONTENT_LENGTH),
        ("GET", 12, CONTENT_LENGTH),
        ("POST", None, CHUNKED),
        ("GET", None, CHUNKED),
    ],
)
def test_request_framing_table(method: str, length: int | None, framing: Framing) -> None:
    assert request_framing(method, length) is framing


def test_chunks_encode_and_read_back() -> None:
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    wire += encode_chunk(b"hello") + encode_chunk(b" " * 300) + LAST_CHUNK
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b" " * 300).startswith(b"12c\r\n")
    parsed = ResponseParser(skip_body=False)
    parsed.parser.feed_data(wire)
    assert parsed.complete
    assert b"".join(parsed.body) == b"hello" + b" " * 300


# ---- both front doors agree ----------------------------------------------------------------------


async def _stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _response(status: int, kind: str) -> Response:
    """``kind``: "content" (bytes in hand), "length" (a stream of known
    length) or "stream" (a stream of unknown length); each carries the
    framing headers an upstream would have sent."""
    if kind == "content":
        return Response(status, Headers([(b"content-length", b"5")]), content=b"hello")
    if kind == "length":
        body = Body(_stream(b"hel", b"lo"), 5)
        return Response(status, Headers([(b"content-length", b"5")]), body=body)
    headers = Headers([(b"transfer-encoding", b"chunked")])
    return Response(status, headers, body=Body(_stream(b"hel", b"lo"), None))


def _listener_view(response: Response, method: str) -> tuple[bool, list[bytes], list[bytes]]:
    """What the native listener writes: (body sent?, content-length values,
    transfer-encoding values)."""
    head, body, framing, _ = response_head(response, method, "1.1", True)
    wire = b"".join(head)
    header_block, _, after = wire.partition(b"\r\n\r\n")
    lines = [line.split(b": ", 1) for line in header_block.split(b"\r\n")[1:]]
    lengths = [v for k, v in lines if k == b"content-length"]
    codings = [v for k, v in lines if k == b"transfer-encoding"]
    sent = bool(after) or body is not None
    assert (framing is NO_BODY) is not sent
    return sent, lengths, codings


async def _asgi_view(response: Response, method: str) -> tuple[bool, list[bytes], list[bytes]]:
    """What the ASGI adapter hands its server, in the same terms."""
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await GatewayASGI._send(send, response, method, "1.1")
    start, *bodies = messages
    headers = start["headers"]
    body = b"".join(m["body"] for m in bodies)
    lengths = [v for k, v in headers if k == b"content-length"]
    codings = [v for k, v in headers if k == b"transfer-encoding"]
    return bool(body), lengths, codings


@pytest.mark.parametrize("kind", ["content", "length", "stream"])
@pytest.mark.parametrize(
    ("status", "method", "has_body"),
    [
        (200, "GET", True),
        (200, "HEAD", False),
        (100, "GET", False),
        (103, "GET", False),
        (204, "GET", False),
        (204, "HEAD", False),
        (304, "GET", False),
        (304, "HEAD", False),
    ],
)
async def test_both_front_doors_frame_alike(
    status: int, method: str, has_body: bool, kind: str
) -> None:
    """The 1xx/204/304/HEAD table for both doors: a body only when the
    framing decision says so; an answer to HEAD keeps the length of the GET
    answer it stands for; 1xx, 204 and 304 carry no length at all. (The
    ASGI adapter never passes transfer-encoding: its server frames.)"""
    listener = _listener_view(_response(status, kind), method)
    asgi = await _asgi_view(_response(status, kind), method)
    assert listener[0] is asgi[0] is has_body
    assert listener[1] == asgi[1]
    if has_body or method == "HEAD":
        assert listener[1] == ([] if kind == "stream" else [b"5"])
        assert listener[2] == ([b"chunked"] if kind == "stream" else [])
    else:
        assert listener[1] == listener[2] == []
    assert asgi[2] == []


async def test_an_unsent_body_is_closed_by_the_asgi_door() -> None:
    closed: list[bool] = []
    body = Body(_stream(b"x"), 1, on_close=lambda: closed.append(True))
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await GatewayASGI._send(send, Response(204, Headers([]), body=body), "GET")
    assert closed
    assert messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_http_10_unknown_length_is_close_delimited() -> None:
    response = Response(200, Headers([]), body=Body(_stream(b"x"), None))
    head, body, framing, keep = response_head(response, "GET", "1.0", True)
    assert framing is CLOSE_DELIMITED and body is not None and keep is False
    wire = b"".join(head)
    assert b"connection: close\r\n" in wire
    assert b"content-length" not in wire and b"transfer-encoding" not in wire


def test_response_head_bytes_and_date() -> None:
    head, body, framing, keep = response_head(
        Response(200, Headers([(b"content-type", b"text/plain")]), content=b"hi"),
        "GET",
        "1.1",
        True,
    )
    assert framing is CONTENT_LENGTH and body is None and keep is True
    assert b"".join(head) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
        + http_date()
        + b"content-length: 2\r\n\r\nhi"
    )
    assert http_date() is http_date()  # made once per second, not per answer
    # An upstream's own Date passes unchanged, and no second one is added.
    own = Headers([(b"date", b"Mon, 01 Jan 2024 00:00:00 GMT")])
    head, _, _, keep = response_head(Response(599, own, content=b""), "GET", "1.1", False)
    wire = b"".join(head)
    assert wire.startswith(b"HTTP/1.1 599 Unknown\r\n")
    assert wire.count(b"date: ") == 1 and b"2024" in wire
    assert wire.endswith(b"content-length: 0\r\nconnection: close\r\n\r\n") and keep is False


# ---- the upstream request head -------------------------------------------------------------------


def test_proxy_request_head_bytes() -> None:
    headers = Headers(
        [
            (b"host", b"api.example.com"),
            (b"user-agent", b"curl"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"x-key-id", b"forged"),
            (b"forwarded", b"for=1.2.3.4"),
            (b"te", b"trailers"),
            (b"content-length", b"3"),
            (b"expect", b"100-continue"),
            (b"accept", b"*/*"),
        ]
    )
    head = proxy_request_head(
        "POST",
        "/base/items?x=1",
        "10.1.1.1:8080",
        headers,
        client_ip="192.0.2.7",
        scheme="https",
        request_id="req-1",
        key_id="key_abc",
        body_length=3,
    )
    assert head == (
        b"POST /base/items?x=1 HTTP/1.1\r\n"
        b"host: 10.1.1.1:8080\r\n"
        b"user-agent: curl\r\n"
        b"accept: */*\r\n"
        b"x-forwarded-for: 10.0.0.1, 192.0.2.7\r\n"
        b"x-forwarded-proto: https\r\n"
        b"x-forwarded-host: api.example.com\r\n"
        b"x-request-id: req-1\r\n"
        b"x-key-id: key_abc\r\n"
        b"content-length: 3\r\n"
        b"\r\n"
    )
    assert {b"te", b"host", b"x-key-id", b"forwarded", b"expect"} <= NOT_FORWARDED


# What a client may not tell the upstream: only a proxy in front of it says
# these, and upstreams build redirects, links, "is this HTTPS", the client's
# address or even the routed path (X-Original-URL) from them.
PROXY_ONLY = [
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-forwarded-server",
    b"x-forwarded-ssl",
    b"x-forwarded-scheme",
    b"x-forwarded-protocol",
    b"x-forwarded-",
    b"x-real-ip",
    b"x-original-url",
    b"x-rewrite-url",
]


def test_proxy_only_headers_from_a_client_are_dropped() -> None:
    kept = [
        (b"x-forwarded", b"no dash after: not a forwarded header"),
        (b"x-forwardedfor", b"2"),
        (b"x-custom", b"3"),
        (b"xforwarded-port", b"4"),
        (b"accept", b"*/*"),
    ]
    raw = [*((name, b"evil") for name in PROXY_ONLY), *kept, (b"", b"empty name")]
    head = proxy_request_head(
        "GET",
        "/",
        "up",
        Headers(raw),
        client_ip="192.0.2.7",
        scheme="http",
        request_id="r",
        key_id=None,
        body_length=0,
    )
    assert head == (
        b"GET / HTTP/1.1\r\n"
        b"host: up\r\n"
        + b"".join(b"%b: %b\r\n" % pair for pair in kept)
        + b"x-forwarded-for: 192.0.2.7\r\n"
        b"x-forwarded-proto: http\r\n"
        b"x-request-id: r\r\n"
        b"\r\n"
    )
    assert b"evil" not in head
    assert {b"x-real-ip", b"x-original-url", b"x-rewrite-url"} <= NOT_FORWARDED


@pytest.mark.parametrize(
    ("method", "length", "framing_line"),
    [
        ("GET", 0, b""),
        ("POST", 0, b"content-length: 0\r\n"),
        ("PUT", None, b"transfer-encoding: chunked\r\n"),
        ("GET", 7, b"content-length: 7\r\n"),
    ],
)
def test_proxy_request_head_framing(method: str, length: int | None, framing_line: bytes) -> None:
    head = proxy_request_head(
        method,
        "/",
        "up",
        Headers([]),
        client_ip="::1",
        scheme="http",
        request_id="r",
        key_id=None,
        body_length=length,
    )
    assert head.endswith(b"x-request-id: r\r\n" + framing_line + b"\r\n")
    assert b"x-forwarded-host" not in head and b"x-key-id" not in head


def test_request_head_of_the_gateways_own() -> None:
    probe = request_head("GET", "/health", "up:81", ((b"user-agent", b"triogate-health"),))
    assert probe == b"GET /health HTTP/1.1\r\nhost: up:81\r\nuser-agent: triogate-health\r\n\r\n"
    assert (
        request_head("POST", "/x", "up")
        == b"POST /x HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n"
    )


# ---- the upstream response parser ----------------------------------------------------------------


def test_response_parser_skips_interim_answers() -> None:
    parsed = ResponseParser(skip_body=False)
    parsed.parser.feed_data(
        b"HTTP/1.1 100 Continue\r\nx-interim: 1\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    assert parsed.status == 201 and parsed.complete and parsed.keep_alive
    assert parsed.headers == [(b"content-length", b"2")]
    assert b"".join(parsed.body) == b"ok"


def test_response_parser_head_answer_has_no_body() -> None:
    parsed = ResponseParser(skip_body=True)
    parsed.parser.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert parsed.headers_done and parsed.complete and not parsed.body


def test_response_parser_keep_alive_and_reset() -> None:
    parsed = ResponseParser(skip_body=False)
    parsed.parser.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    assert parsed.complete and parsed.keep_alive
    parsed.reset(skip_body=False)
    parsed.parser.feed_data(b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert parsed.status == 500 and parsed.complete and not parsed.keep_alive


def test_response_parser_close_delimited() -> None:
    parsed = ResponseParser(skip_body=False)
    parsed.parser.feed_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome")
    assert parsed.headers_done and not parsed.complete and parsed.close_delimited()
    framed = ResponseParser(skip_body=False)
    framed.parser.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsome")
    assert not framed.close_delimited()


def test_response_parser_refuses_garbage() -> None:
    with pytest.raises(httptools.HttpParserError):
        ResponseParser(skip_body=False).parser.feed_data(b"SPDY/9 what\r\n\r\n")


# ---- the request head's framing ------------------------------------------------------------------


def _parsed(wire: bytes) -> PendingRequest:
    parser = RequestParser(max_header=8192, max_body=1 << 20)
    parser.parser.feed_data(wire)
    return parser.ready.popleft()


@pytest.mark.parametrize(
    ("wire", "length", "expect"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", 3, None),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", None, None),
        (
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
            9,
            b"100-continue",
        ),
        (b"GET / HTTP/1.0\r\n\r\n", 0, None),
        # Framed as llhttp framed it, even when Connection names the header.
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\n"
            b"Content-Length: 2\r\n\r\nhi",
            2,
            None,
        ),
    ],
)
def test_request_framing_as_parsed(wire: bytes, length: int | None, expect: bytes | None) -> None:
    pending = _parsed(wire)
    assert pending.read_framing() == length
    assert pending.expect == expect


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
    ],
)
def test_request_needs_exactly_one_host(wire: bytes) -> None:
    with pytest.raises(BadRequest):
        _parsed(wire).read_framing()
