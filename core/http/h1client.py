"""HTTP/1.1 as the upstreams' client (sans-IO): the request heads the
gateway writes and the llhttp (httptools) glue that reads their answers.

``proxy_request_head`` is a client's request as it goes upstream: the
request line for the chosen target, ``host`` the target's authority, the
client's headers without the hop-by-hop ones, those the gateway sets itself
and those only a proxy may set (``NOT_FORWARDED``, and every
``x-forwarded-*``), then the gateway's ``x-forwarded-for/-proto/-host``,
``x-request-id`` and ``x-key-id``, and the body's framing
(``h1frame.request_framing``).
``request_head`` is a request of the gateway's own (the health probe).

``ResponseParser`` collects one answer at a time on a keep-alive
connection: its head (skipping 1xx interim answers), and its body chunks
as they arrive. The upstream client (dataplane/exchange.py) owns the
socket, the timeouts and the pool.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Final

import httptools

from triogate.http.h1frame import CHUNKED, CONTENT_LENGTH, NO_BODY, request_framing
from triogate.http.message import FORWARDED_PREFIX, GATEWAY_SET, Headers

__all__ = [
    "MAX_RESPONSE_HEAD_BYTES",
    "NOT_FORWARDED",
    "ResponseParser",
    "proxy_request_head",
    "request_head",
]

# An answer's head (interim 1xx heads included) larger than this is refused
# (502): counted by the upstream client as bytes fed before the head is done.
MAX_RESPONSE_HEAD_BYTES: Final = 65536

# The client's headers that do not go upstream: the hop-by-hop ones, those
# the gateway sets itself and those only a proxy may set (one set with the
# one that guards them against underscore shadows, ``message.GATEWAY_SET``),
# and every other ``x-forwarded-*`` (``message.FORWARDED_PREFIX``).
NOT_FORWARDED: Final = GATEWAY_SET


def _request_line(method: str, target: str, authority: str) -> bytes:
    return f"{method} {target} HTTP/1.1\r\nhost: {authority}\r\n".encode("latin-1")


def _framing_line(method: str, body_length: int | None) -> bytes:
    framing = request_framing(method, body_length)
    if framing is CONTENT_LENGTH:
        assert body_length is not None  # decided only for a known length
        return b"content-length: %d\r\n\r\n" % body_length
    if framing is CHUNKED:
        return b"transfer-encoding: chunked\r\n\r\n"
    return b"\r\n"


def proxy_request_head(
    method: str,
    target: str,
    authority: str,
    headers: Headers,
    *,
    client_ip: str,
    scheme: str,
    request_id: str,
    key_id: str | None,
    body_length: int | None,
    key_roles: tuple[str, ...] = (),
) -> bytes:
    """The head of a client's request as it goes to an upstream at
    ``authority``: ``target`` is the upstream's path and query, ``headers``
    the client's (the front doors already removed Connection and what it
    names), ``client_ip`` and ``scheme`` what it came with, ``key_id`` the
    key it was admitted with (if any) and ``key_roles`` its roles (sent as
    ``X-Key-Roles``), ``body_length`` its body's length (0: none, None: not
    known, so chunked)."""
    drop = NOT_FORWARDED
    lines = [f"{method} {target} HTTP/1.1\r\nhost: {authority}\r\n".encode("latin-1")]
    forwarded_for: list[bytes] = []
    original_host = None
    for name, value in headers.raw:
        if name not in drop:  # b"" is in it: name[0] exists
            # 0x78 is 'x': the prefix test runs only for x- names.
            if name[0] != 0x78 or not name.startswith(FORWARDED_PREFIX):
                lines.append(b"%b: %b\r\n" % (name, value))
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
        elif name == b"host" and original_host is None:
            original_host = value
    forwarded_for.append(client_ip.encode("ascii"))
    lines.append(b"x-forwarded-for: %b\r\n" % b", ".join(forwarded_for))
    lines.append(b"x-forwarded-proto: %b\r\n" % scheme.encode("ascii"))
    if original_host is not None:
        lines.append(b"x-forwarded-host: %b\r\n" % original_host)
    lines.append(b"x-request-id: %b\r\n" % request_id.encode("ascii"))
    if key_id is not None:
        lines.append(b"x-key-id: %b\r\n" % key_id.encode("ascii"))
    if key_roles:  # role names are tokens (control.roles): a list as is
        lines.append(b"x-key-roles: %b\r\n" % ",".join(key_roles).encode("ascii"))
    # Decided by request_framing, written inline: this runs for every request.
    framing = request_framing(method, body_length)
    if framing is NO_BODY:
        lines.append(b"\r\n")
    elif framing is CONTENT_LENGTH:
        assert body_length is not None  # decided only for a known length
        lines.append(b"content-length: %d\r\n\r\n" % body_length)
    else:
        lines.append(b"transfer-encoding: chunked\r\n\r\n")
    return b"".join(lines)


def request_head(
    method: str,
    target: str,
    authority: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body_length: int | None = 0,
) -> bytes:
    """The head of a request the gateway makes itself: ``headers`` (lower-
    case names) as given, framed for a body of ``body_length`` bytes."""
    lines = [_request_line(method, target, authority)]
    lines.extend(b"%b: %b\r\n" % (name, value) for name, value in headers)
    lines.append(_framing_line(method, body_length))
    return b"".join(lines)


class ResponseParser:
    """httptools callbacks for the answers on one upstream connection.

    ``feed_data`` raises ``httptools.HttpParserError`` for garbage;
    ``HttpParserUpgrade`` after a complete 101
    head followed by bytes of the new protocol."""

    __slots__ = (
        "body",
        "complete",
        "headers",
        "headers_done",
        "interim",
        "keep_alive",
        "parser",
        "skip_body",
        "status",
    )

    def __init__(self, skip_body: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reset(skip_body)

    def reset(self, skip_body: bool) -> None:
        """Ready for the next response on the same keep-alive connection
        (llhttp itself is ready once the previous message completed).
        ``skip_body``: the answer is to HEAD, so it has no body whatever
        its headers say."""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.body: collections.deque[bytes] = collections.deque()
        self.status = 0
        self.skip_body = skip_body
        self.keep_alive = False
        self.interim = False

    def close_delimited(self) -> bool:
        """The body has neither a length nor chunks: the close ends it."""
        headers = Headers(self.headers)
        return (
            headers.get_raw(b"content-length") is None
            and headers.get_raw(b"transfer-encoding") is None
        )

    def on_message_begin(self) -> None:
        if self.interim:
            # The final response after a 1xx interim one (100 Continue,
            # 103 Early Hints): forget the interim one's headers.
            self.interim = False
            self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        # The head's size is bounded by whoever feeds the parser (the bytes
        # fed before the head is complete: also an endless single line,
        # which llhttp never reports as a header).
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            self.interim = True  # not the answer: keep reading for the final one
            return
        # Read it now: llhttp resets the flag once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.skip_body:
            # A response to HEAD (or a 1xx/204/304) has no body whatever its
            # Content-Length says; llhttp cannot know about HEAD, so we stop.
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.interim:
            self.complete = True
