"""HTTP without I/O: the message model every part of the data plane shares
(``message``), the HTTP/1.1 request parser glue (``h1parse``), response
framing (``h1write``) and client-address normalisation (``netaddr``).

Nothing here touches a socket; the listener, the ASGI adapter and the
upstream client drive these pieces from their own loops."""

from triogate.http.message import (
    GATEWAY_SET,
    HOP_BY_HOP,
    Body,
    ClientDisconnected,
    Headers,
    Request,
    Response,
    body_from_bytes,
    check_target,
    strip_connection_headers,
)

__all__ = [
    "GATEWAY_SET",
    "HOP_BY_HOP",
    "Body",
    "ClientDisconnected",
    "Headers",
    "Request",
    "Response",
    "body_from_bytes",
    "check_target",
    "strip_connection_headers",
]
