"""HTTP/1.1 body framing (sans-IO): how a message's body is delimited on the
wire, decided in one place for every door of the gateway.

A response's framing depends on its status, the request's method and
version, and whether the body's length is known (RFC 9112 §6.3):

* 1xx, 204 and 304 answers, and any answer to HEAD, have no body
  (``NO_BODY``); an answer to HEAD keeps the framing headers the answer to
  GET would have, the others have none;
* a known length is sent as ``Content-Length`` (``CONTENT_LENGTH``);
* an unknown length is chunked for an HTTP/1.1 client (``CHUNKED``) and
  ended by closing the connection for an HTTP/1.0 one (``CLOSE_DELIMITED``:
  the connection cannot be kept).

The native listener writes these decisions as bytes (h1write.py); the ASGI
adapter passes them on as ASGI messages and leaves chunking to its server.
A request to an upstream is framed by ``request_framing``; chunks are
encoded by ``encode_chunk``.

The hot paths compare against the module constants (``CHUNKED`` and so on):
an enum member looked up on its class costs ~80 ns on CPython 3.11.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "CHUNKED",
    "CLOSE_DELIMITED",
    "CONTENT_LENGTH",
    "FRAMING_HEADERS",
    "LAST_CHUNK",
    "NO_BODY",
    "NO_BODY_STATUSES",
    "Framing",
    "encode_chunk",
    "request_framing",
    "response_framing",
]


class Framing(enum.Enum):
    """How a body is delimited on an HTTP/1.1 connection."""

    NO_BODY = "no body"
    CONTENT_LENGTH = "content-length"
    CHUNKED = "chunked"
    CLOSE_DELIMITED = "close-delimited"


NO_BODY: Final = Framing.NO_BODY
CONTENT_LENGTH: Final = Framing.CONTENT_LENGTH
CHUNKED: Final = Framing.CHUNKED
CLOSE_DELIMITED: Final = Framing.CLOSE_DELIMITED

# The headers that frame a body: a door writes its own, except on an answer
# to HEAD, whose framing headers describe the answer to GET it stands for.
FRAMING_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding"})
# Final answers that never have a body, whatever their headers say.
NO_BODY_STATUSES: Final = frozenset({204, 304})
LAST_CHUNK: Final = b"0\r\n\r\n"

# Methods whose request means to carry a body: sent without one, they say
# ``Content-Length: 0`` so the upstream need not guess (RFC 9110 §8.6).
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


def response_framing(status: int, method: str, version: str, length: int | None) -> Framing:
    """The framing of an answer with ``status`` to a ``method`` request made
    over HTTP/``version``, whose body is ``length`` bytes (None: not known
    before it ends). ``CLOSE_DELIMITED`` means the connection closes after
    it: a keep-alive connection is kept only for the other three."""
    if status < 200 or status in NO_BODY_STATUSES or method == "HEAD":
        return NO_BODY
    if length is not None:
        return CONTENT_LENGTH
    if version == "1.1":
        return CHUNKED
    return CLOSE_DELIMITED


def request_framing(method: str, length: int | None) -> Framing:
    """The framing of a request body of ``length`` bytes (None: not known)
    sent to an upstream, which always speaks HTTP/1.1 with the gateway. No
    body (``length`` 0) is ``NO_BODY``, except for the methods that carry
    one, which say ``Content-Length: 0``."""
    if length is None:
        return CHUNKED
    if length or method in _BODY_METHODS:
        return CONTENT_LENGTH
    return NO_BODY


def encode_chunk(chunk: bytes) -> bytes:
    """One chunk of a chunked body (not empty: an empty chunk ends the body,
    which is ``LAST_CHUNK``'s job)."""
    return b"%x\r\n%b\r\n" % (len(chunk), chunk)
