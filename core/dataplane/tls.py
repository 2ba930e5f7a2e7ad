"""TLS on the data plane's raw sockets: the listener's HTTPS and https
upstreams, over the same non-blocking socket code as plain connections.

Design (why not ``trio.SSLStream``, why not ``ssl.MemoryBIO``)
---------------------------------------------------------------
The data plane's connection and exchange code works on a socket's ``recv``
and ``send`` directly, parking on the descriptor only when the kernel says
"not yet" (sockio.py explains why: a trio stream's every operation is a
checkpoint). A TLS connection here is an ``ssl.SSLSocket`` over that same
non-blocking descriptor: OpenSSL reads and writes the socket itself, in C,
with one system call per record and no Python in between. ``TLSSocket``
(the contexts' ``sslsocket_class``) only translates OpenSSL's "want read" /
"want write" into the ``BlockingIOError`` that plain sockets raise, so the
connection loop, ``sockio.wait_recv`` / ``send_all`` and the exchange run
unchanged and the plain path has no branch for TLS at all: the listener
picks the connection's class once, when it accepts it.

``trio.SSLStream`` would mean a ``trio.SocketStream`` per connection and a
checkpoint (a scheduler pass) per read and write, the cost sockio.py exists
to avoid; a ``MemoryBIO`` pair costs three Python-level calls and two copies
per read (socket to BIO, BIO to plaintext) where ``SSLSocket`` costs one C
call. Both would also need their own read and write paths in the
connection code. The price of ``SSLSocket``: OpenSSL's retry rule (a write
that wanted more room must be repeated with the same bytes), which
``sockio.send_all`` already keeps (it resends the rest of the same buffer),
and a read that may want to write (a TLS 1.3 key update's answer) is
retried when the socket is readable again, which the peer's next record
makes it.

A handshake is driven by ``handshake`` with its own deadline on the
sockio watchdog; its failures (garbage, plain HTTP, an unknown CA, a
timeout) are the caller's to count and log.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Any, cast

from triogate.config_tls import ServerTLSConfig
from triogate.config_tls import client_context as _client_context
from triogate.config_tls import server_context as _server_context
from triogate.dataplane import sockio

__all__ = [
    "TLSSocket",
    "client_context",
    "handshake",
    "peer_subject",
    "server_context",
]

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TLSSocket(ssl.SSLSocket):
    """An SSLSocket that reads and writes like a non-blocking plain socket:
    ``BlockingIOError`` for "not yet", ``b""`` at the end.

    The end is a close_notify, or on the listener also a client that just
    closed (a request is never close-delimited: its framing tells a
    truncated one apart). Towards an upstream a bare FIN without
    close_notify raises ``ssl.SSLEOFError`` (an OSError, as a reset):
    an answer with neither Content-Length nor chunking is complete over
    TLS only with a close_notify (RFC 9112 section 9.8), or anyone on the
    path could cut it short and have it passed on as whole."""

    _sslobj: Any  # the C-level SSL object (ssl.SSLSocket's, not in its stubs)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            data: bytes = self._sslobj.read(buflen)
        except _WANT:
            raise BlockingIOError() from None
        except ssl.SSLEOFError:
            if self.server_side:
                return b""
            raise
        except AttributeError:
            # _sslobj is None: closed, or wrap_socket found the peer gone
            # (reset before the wrap) and probes it with recv(1). That probe
            # closes what it made only on ENOTCONN: a plain recv's
            # ECONNRESET would escape it and leave the descriptor to the
            # garbage collector. Not connected it is, either way.
            raise OSError(errno.ENOTCONN, "TLS socket not connected") from None
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        # All or nothing (OpenSSL's partial writes are off): after "want
        # write" the same bytes come again, as sockio.send_all does.
        try:
            sent: int = self._sslobj.write(data)
        except _WANT:
            raise BlockingIOError() from None
        except AttributeError:
            raise OSError(errno.EBADF, "closed TLS socket") from None
        return sent


def server_context(tls: ServerTLSConfig) -> ssl.SSLContext:
    """The listener's context (files read now). Raises ConfigError."""
    context = _server_context(tls)
    context.sslsocket_class = TLSSocket
    return context


def client_context(ca_file: str | None, verify: bool, field: str) -> ssl.SSLContext:
    """An upstream's context. Raises ConfigError."""
    context = _client_context(ca_file, verify, field)
    context.sslsocket_class = TLSSocket
    return context


async def handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    deadline: float,
    *,
    server_hostname: str | None = None,
) -> TLSSocket:
    """Wrap ``sock`` (its descriptor moves to the returned socket: ``sock``
    is detached) and run the handshake before ``deadline`` (trio time).
    Raises TimeoutError, ssl.SSLError or OSError; the returned socket is
    closed on every failure."""
    tls = context.wrap_socket(
        sock,
        server_side=server_hostname is None,
        server_hostname=server_hostname,
        do_handshake_on_connect=False,
    )
    assert isinstance(tls, TLSSocket)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                ready = await sockio.park(tls, deadline, write=False)
            except ssl.SSLWantWriteError:
                ready = await sockio.park(tls, deadline, write=True)
            if not ready:
                raise TimeoutError("the TLS handshake did not finish in time")
    except BaseException:
        sockio.close(tls)
        raise


# RFC 4514 short names for the attributes a subject usually has.
_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _hex(c: str) -> str:
    return "".join(f"\\{b:02X}" for b in c.encode())


def _escape(value: str) -> str:
    # RFC 4514's specials get a backslash; control characters (CR, LF, NUL,
    # ESC, C1 controls) and Unicode line breaks their UTF-8 bytes in hex
    # (RFC 4514 allows \XX for any byte): the subject comes from a client's
    # certificate, and a plugin may put it in a header or a log line.
    out = "".join(
        "\\" + c
        if c in ',+"\\<>;='
        else _hex(c)
        if c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029"
        else c
        for c in value
    )
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def peer_subject(tls: ssl.SSLSocket) -> str | None:
    """The verified client certificate's subject as an RFC 4514 string
    (``CN=alice,O=Example``: most specific first), or None without one."""
    cert = tls.getpeercert()
    if not cert:
        return None
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    rdns = [
        "+".join(f"{_SHORT.get(name, name)}={_escape(str(value))}" for name, value in rdn)
        for rdn in subject
    ]
    return ",".join(reversed(rdns))
