"""Writing HTTP/1.1 response heads for the native listener (sans-IO).

``response_head`` turns a ``Response`` into the bytes of its status line and
header block, with the framing ``h1frame.response_framing`` decides
(Content-Length, chunked, close-delimited for HTTP/1.0, or no body) and
whether the connection may stay open. The listener sends the bytes;
nothing here touches a socket.

``Date``: RFC 9110 §6.6.1 wants one on every answer from a server with a
clock. The gateway adds it to the answers it makes itself and to an
upstream answer that came without one; an upstream's own Date passes
through unchanged (it is the origin's word on when the answer was made).
Formatting a date costs microseconds, so the string is made once per second
and reused, as nginx and uvicorn do.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from triogate.http.h1frame import (
    CHUNKED,
    CONTENT_LENGTH,
    FRAMING_HEADERS,
    NO_BODY,
    Framing,
    response_framing,
)
from triogate.http.message import Body, Response

__all__ = ["http_date", "response_head"]

_REASONS: Final = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
STATUS_LINES: Final = {
    code: b"HTTP/1.1 %d %b\r\n" % (code, reason) for code, reason in _REASONS.items()
}


class _DateCache:
    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""


_date = _DateCache()


def http_date() -> bytes:
    """The current ``date: ...\\r\\n`` header line (IMF-fixdate), cached per second."""
    now = int(time.time())
    if now != _date.second:
        _date.second = now
        _date.line = b"date: %b\r\n" % formatdate(now, usegmt=True).encode("ascii")
    return _date.line


def response_head(
    response: Response, method: str, version: str, keep_alive: bool
) -> tuple[list[bytes], Body | None, Framing, bool]:
    """The head of ``response`` as a list of byte strings (the caller joins
    them; an item is a piece, not a line; ``content`` is appended when
    there is any to send), the body still to stream (None when none is to
    be sent: the caller closes an unsent ``response.body``), how that body
    is framed, and whether the connection may be kept."""
    status = response.status
    head = [STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
    head_request = method == "HEAD"
    has_date = False
    for name, value in response.headers.raw:
        if name in FRAMING_HEADERS and not head_request:
            continue
        if name == b"date":
            has_date = True
        # Four pieces for the caller's join, not one formatted line each:
        # no intermediate bytes object per header.
        head += (name, b": ", value, b"\r\n")
    if not has_date:
        head.append(http_date())
    content = response.content
    body = response.body
    if body is None:
        length: int | None = 0 if content is None else len(content)
    else:
        length = body.length
    framing = response_framing(status, method, version, length)
    if framing is CONTENT_LENGTH:
        assert length is not None  # decided only for a known length
        head.append(b"content-length: %d\r\n" % length)
    elif framing is CHUNKED:
        head.append(b"transfer-encoding: chunked\r\n")
    elif framing is NO_BODY:
        content, body = None, None
    else:
        keep_alive = False  # close-delimited: the close ends the body
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    if content:
        head.append(content)
    return head, body, framing, keep_alive
