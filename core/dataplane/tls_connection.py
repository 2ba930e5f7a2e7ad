"""A client connection of the listener over TLS: the same connection code
(connection.py) on a ``TLSSocket`` (tls.py), plus what TLS knows of the
client: its verified certificate's subject and the ``https`` scheme.

The listener picks this class when it accepts a connection with
``[server.tls]`` on: plain connections keep ``Connection`` and never test
for TLS.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING

import trio

from triogate.dataplane.connection import Connection
from triogate.dataplane.tls import handshake, peer_subject
from triogate.http import Request
from triogate.http.h1parse import PendingRequest

if TYPE_CHECKING:
    from triogate.dataplane.listener import ProxyListener

__all__ = ["TLSConnection", "TLSRequest"]

log = logging.getLogger("triogate.dataplane.listener")


class TLSRequest(Request):
    """A request that came over TLS: ``client_cert`` has its own slot here
    (``Request`` has only the class's None)."""

    __slots__ = ("client_cert",)

    def __init__(self, plain: Request, client_cert: str | None) -> None:
        super().__init__(
            method=plain.method,
            path=plain.path,
            query=plain.query,
            headers=plain.headers,
            body=plain.body,
            client_ip=plain.client_ip,
            scheme="https",
            http_version=plain.http_version,
        )
        self.client_cert = client_cert


class TLSConnection(Connection):
    """One TLS client connection: handshake, then ``Connection.serve``."""

    __slots__ = ("client_cert",)

    def __init__(self, sock: socket.socket, peer: str, listener: ProxyListener) -> None:
        super().__init__(sock, peer, listener)
        self.client_cert: str | None = None

    async def start(self, context: ssl.SSLContext, seconds: float) -> bool:
        """The handshake, within ``seconds``: True when done (``sock`` is
        the TLS socket from then on), False when it failed (counted and
        logged at debug: garbage, plain HTTP, a refused client certificate
        or a client that never finishes are the client's problem, not the
        gateway's)."""
        raw = self.sock
        try:
            tls = await handshake(raw, context, trio.current_time() + seconds)
        except TimeoutError:
            self.listener.tls_failures += 1
            log.debug("TLS handshake from %s timed out after %g s", self.client_ip, seconds)
            return False
        except OSError as exc:  # ssl.SSLError is an OSError
            self.listener.tls_failures += 1
            reason = exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror
            log.debug("TLS handshake from %s failed: %s", self.client_ip, reason or exc)
            return False
        self.sock = tls
        self.client_cert = peer_subject(tls)
        return True

    def _request(self, pending: PendingRequest) -> Request:
        return TLSRequest(Connection._request(self, pending), self.client_cert)
