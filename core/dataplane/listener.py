"""The proxy listener: a purpose-built HTTP/1.1 server on trio and httptools.

Why not hypercorn here: measured on this kind of machine, hypercorn's trio
worker tops out near 2.4k req/s for a bare app, a trio server on the llhttp
parser near 20k. The data plane is the product's hot path, so it gets the
second; hypercorn still serves the admin API, and can serve this same
pipeline as an ASGI app (``triogate.asgi``) for HTTP/2 or TLS.

Theory of operation
-------------------
This module accepts connections; each gets one task in the listener's
nursery that serves its requests (connection.py: reading, limits and
writing; the bytes are the codec's, ``triogate.http``: h1parse.py the llhttp
callbacks, h1frame.py the framing decisions, h1write.py the answer heads).

Accepting: the peer's address is taken as the client's IP, an IPv4-mapped
one (``[::]`` listeners are dual-stack) unmapped to plain IPv4. At most
``max_connections`` connections are served at once, lowered to what the
file-descriptor limit carries with a reserve left for the admin listener,
LMDB and upstream connections; one more is answered 503
``TOO_MANY_CONNECTIONS`` and closed.

TLS (``[server.tls]``, docs/tls.md): the context is built from the files
at start and again on every reload (a bad file keeps the old context); a
connection accepted while it is on is a ``TLSConnection`` (tls_connection.py)
that shakes hands within ``handshake_timeout_seconds`` and then runs the
same connection code. The choice is made per accepted connection, never per
request. Over the connection cap a TLS connection is closed without a word
(a 503 in plain text means nothing to a TLS client).

Shutdown: stop accepting, close idle connections at once, let in-flight
requests finish (answered with ``Connection: close``) until the grace
period ends, then cancel what is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable
from typing import Final

import msgspec
import trio

from triogate.config import ServerConfig
from triogate.dataplane import sockio
from triogate.dataplane.connection import READ_SIZE, Connection
from triogate.dataplane.pipeline import Pipeline, new_request_id, problem_response
from triogate.dataplane.tls import server_context
from triogate.dataplane.tls_connection import TLSConnection
from triogate.errors import ClientDisconnected, ConfigError, GatewayError, TooManyConnections
from triogate.http.h1write import response_head
from triogate.http.netaddr import client_ip

__all__ = ["ListenerStatistics", "ProxyListener", "connection_cap", "parse_listen"]

log = logging.getLogger("triogate.dataplane.listener")

# accept() errors that concern one connection, not the listener (as trio
# treats them), and those that mean "out of resources, try again soon".
_ACCEPT_TRANSIENT: Final = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
_ACCEPT_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# File descriptors kept back from the proxy's connections: the admin
# listener and /health, LMDB, the access log, idle upstream pools.
FD_RESERVE_MIN: Final = 64
FD_RESERVE_SHARE: Final = 0.10
# Connections over the cap being answered 503 at once (each holds its
# descriptor for up to REFUSE_LINGER seconds); beyond these, a new
# connection is closed without a word.
REFUSING_MAX: Final = 16
REFUSE_LINGER: Final = 1.0
REFUSED_LOG_EVERY: Final = 10.0  # seconds between "refused N connections" lines


class ListenerStatistics(msgspec.Struct, frozen=True):
    """The proxy listener right now (``ProxyListener.statistics()``)."""

    address: str
    connections: int  # open client connections
    max_connections: int  # the cap in force
    in_flight: int  # requests being handled
    accepted: int  # connections accepted in all
    refused: int  # connections refused over the cap
    closing: bool  # draining for shutdown
    tls: bool = False  # [server.tls] is on
    tls_failures: int = 0  # TLS handshakes failed or timed out


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


DEFAULT_MAX_CONNECTIONS: Final = ServerConfig().max_connections


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """The proxy connections allowed at once: ``max_connections``, lowered
    to what the file-descriptor limit can carry. A reserve (10%, at least
    64) stays free for everything else; each proxy connection may hold an
    upstream connection too, so each counts twice against the rest."""
    if fd_limit == resource.RLIM_INFINITY or fd_limit <= 0:
        return max_connections
    reserve = max(FD_RESERVE_MIN, int(fd_limit * FD_RESERVE_SHARE))
    return max(1, min(max_connections, (fd_limit - reserve) // 2))


def fd_limit() -> int:
    """The soft RLIMIT_NOFILE of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ProxyListener:
    """Accepts connections on ``proxy_listen`` and serves them with the
    current pipeline (``get_pipeline`` is called once per request, so a
    reload takes effect for the next request while in-flight ones finish on
    the config they started with).

    At most ``cap`` connections are served at once (``max_connections``,
    lowered to what the file-descriptor limit carries with a reserve for
    everything else, see ``connection_cap``); one more is answered 503
    ``TOO_MANY_CONNECTIONS`` and closed, so the descriptors the admin
    listener, LMDB and the upstreams need are never taken by clients."""

    def __init__(
        self,
        config: ServerConfig,
        get_pipeline: Callable[[], Pipeline],
        *,
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port
        self.get_pipeline = get_pipeline
        self.closing = False
        self.in_flight = 0
        self.connections: set[Connection] = set()
        self.accepted = 0
        self.refused = 0
        self.refusing = 0
        self._refused_logged = (0.0, 0)  # (when, self.refused then)
        self._address = ""
        self._accept_scope: trio.CancelScope | None = None
        self.config = config
        self.cap = 0  # set by reconfigure
        self.tls_context: ssl.SSLContext | None = None  # set by reconfigure
        self.tls_failures = 0
        self.reconfigure(config)

    def reconfigure(self, config: ServerConfig) -> None:
        """New settings (a reload): timeouts and caps apply to the next read
        and the next accepted connection; the TLS certificates are read
        again (new connections get them, open ones keep theirs)."""
        self._load_tls(config)
        self.config = config
        limit = fd_limit()
        previous = self.cap
        self.cap = connection_cap(config.max_connections, limit)
        if self.cap < config.max_connections and self.cap != previous:
            # The default asks for more than most hosts' descriptor limit
            # carries: lowering it is routine (INFO). A value the operator
            # chose that cannot be honoured is worth a WARNING.
            chosen = config.max_connections != DEFAULT_MAX_CONNECTIONS
            log.log(
                logging.WARNING if chosen else logging.INFO,
                "max_connections %d lowered to %d: the file-descriptor limit is %d and "
                "some are kept for the admin listener, storage and upstream connections",
                config.max_connections,
                self.cap,
                limit,
            )

    def _load_tls(self, config: ServerConfig) -> None:
        tls = config.tls
        if tls is None:
            self.tls_context = None
            return
        try:
            self.tls_context = server_context(tls)
        except ConfigError as exc:
            if self.tls_context is None and config is self.config:
                raise  # at start: the listener cannot serve without its certificate
            # A reload validated these files moments ago; they changed since.
            log.error(
                "TLS certificates not reloaded, the previous ones stay in use: %s",
                "; ".join(exc.lines()),
            )

    def __repr__(self) -> str:
        return (
            f"<ProxyListener {self.address} {len(self.connections)}/{self.cap} connections, "
            f"{self.in_flight} in flight{', closing' if self.closing else ''}>"
        )

    @property
    def address(self) -> str:
        return self._address or self.config.proxy_listen

    def statistics(self) -> ListenerStatistics:
        return ListenerStatistics(
            address=self.address,
            connections=len(self.connections),
            max_connections=self.cap,
            in_flight=self.in_flight,
            accepted=self.accepted,
            refused=self.refused,
            closing=self.closing,
            tls=self.tls_context is not None,
            tls_failures=self.tls_failures,
        )

    def _bind(self) -> socket.socket:
        host, port = parse_listen(self.config.proxy_listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "[::]" means every address, IPv4 too, whatever the host's
                # net.ipv6.bindv6only default says (IPv4 peers then arrive
                # mapped, ::ffff:a.b.c.d, and are unmapped at accept).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if self.reuse_port:
                # server.workers > 1: every worker binds the same port and
                # the kernel spreads new connections across them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _accept(self, sock: socket.socket) -> tuple[socket.socket, str]:
        while True:
            try:
                conn, addr = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    log.error("accept failed: %s; pausing", exc)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue  # that one connection failed: the next may not
                raise
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn.close()  # reset before we got to it
                continue
            # One form per client: an IPv4 peer of a dual-stack listener is
            # 127.0.0.1, not ::ffff:127.0.0.1 (ip-restriction, rate limits
            # by IP, X-Forwarded-For and the access log all read this).
            return conn, client_ip(str(addr[0]))

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self._bind()
        host, port = listen.getsockname()[:2]
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            async with trio.open_nursery() as nursery:
                scheme = "http" if self.tls_context is None else "https"
                task_status.started(f"{scheme}://{self.address}")
                with trio.CancelScope() as self._accept_scope:
                    while True:
                        conn, peer = await self._accept(listen)
                        self.accepted += 1
                        tls = self.tls_context
                        if len(self.connections) < self.cap:
                            # Counted now, not when its task first runs: a
                            # burst of accepts must not overshoot the cap.
                            if tls is None:
                                served = Connection(conn, peer, self)
                                self.connections.add(served)
                                nursery.start_soon(self._serve, served)
                            else:
                                secured = TLSConnection(conn, peer, self)
                                self.connections.add(secured)
                                nursery.start_soon(self._serve_tls, secured, tls)
                            continue
                        self._count_refused()
                        if tls is not None:
                            sockio.close(conn)  # no plain-text 503 for a TLS client
                        elif self.refusing < REFUSING_MAX:
                            nursery.start_soon(self._refuse, conn)
                        else:
                            sockio.close(conn)  # a flood: no words to spare
                        # A flood of connections must not keep this loop
                        # from yielding to the ones being served.
                        await trio.lowlevel.checkpoint()
                # Refuse new connections at once (not leave them in the
                # backlog to be reset when the drain is over).
                sockio.close(listen)
                # Not accepting any more: in-flight requests finish (the
                # nursery waits for them) unless the grace period ends first.
        finally:
            sockio.close(listen)

    def _count_refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        last, count = self._refused_logged
        if now - last >= REFUSED_LOG_EVERY:
            self._refused_logged = (now, self.refused)
            log.warning(
                "%d connection(s) refused: %d open, max_connections in force is %d",
                self.refused - count,
                len(self.connections),
                self.cap,
            )

    async def _refuse(self, sock: socket.socket) -> None:
        """Over the cap: a 503 problem+json with ``Connection: close``, then
        hang up. What the client sent is read (and dropped) for a moment
        first: closing with unread bytes sends a reset, which can destroy
        the answer before the client reads it."""
        self.refusing += 1
        try:
            with contextlib.suppress(BlockingIOError):
                sock.recv(READ_SIZE)
            response = problem_response(
                TooManyConnections("the gateway is at its connection limit; try again later"),
                new_request_id(),
            )
            response.headers.raw.append((b"retry-after", b"1"))
            head, _, _, _ = response_head(response, "GET", "1.1", keep_alive=False)
            # A fresh connection's send buffer takes this small answer whole.
            sock.send(b"".join(head))
            sock.shutdown(socket.SHUT_WR)
            until = trio.current_time() + REFUSE_LINGER
            for _ in range(16):  # at most 16 reads of whatever else comes
                if not await sockio.recv(sock, READ_SIZE, until):
                    break  # the client closed, or the linger is over
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            self.refusing -= 1
            sockio.close(sock)

    async def _serve(self, conn: Connection) -> None:
        try:
            await conn.serve()
        except ClientDisconnected:
            pass
        except GatewayError as exc:
            await conn.send_error(exc, None)
        except Exception:
            log.exception("connection from %s failed", conn.client_ip)
        finally:
            self.connections.discard(conn)
            sockio.close(conn.sock)

    async def _serve_tls(self, conn: TLSConnection, context: ssl.SSLContext) -> None:
        """The handshake, then the connection's requests (``_serve``)."""
        tls = self.config.tls
        seconds = tls.handshake_timeout_seconds if tls is not None else 10.0
        started = False
        try:
            started = await conn.start(context, seconds)
        except Exception:
            # A bug, not the client's doing: this connection only.
            log.exception("TLS connection from %s failed", conn.client_ip)
        finally:
            if not started:  # failed, or cancelled (shutdown) mid-handshake
                self.connections.discard(conn)
                sockio.close(conn.sock)
        if started:
            await self._serve(conn)

    def shutdown(self) -> None:
        """Stop accepting; close idle connections; let in-flight ones finish."""
        self.closing = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for conn in list(self.connections):
            if conn.idle:
                sockio.interrupt(conn.sock)
