"""HTTP without I/O: the message model every part of the data plane shares
(``message``), one HTTP/1.1 codec, and client-address normalisation
(``netaddr``).

The codec, in the manner of h11 (bytes in, decisions and bytes out):

* ``h1frame``: how a body is framed (Content-Length, chunked,
  close-delimited, none), decided once for the listener and the ASGI
  adapter alike, and chunk encoding;
* ``h1parse``: the llhttp (httptools) glue that reads requests;
* ``h1write``: response heads as the native listener writes them;
* ``h1client``: the upstream request head, and the glue that reads the
  upstream's answers (used by the upstream client and the health checker).

Nothing here touches a socket; the listener, the ASGI adapter, the upstream
client and the health checker drive these pieces from their own loops."""

from triogate.http.message import (
    GATEWAY_SET,
    HOP_BY_HOP,
    Body,
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
    "Headers",
    "Request",
    "Response",
    "body_from_bytes",
    "check_target",
    "strip_connection_headers",
]
