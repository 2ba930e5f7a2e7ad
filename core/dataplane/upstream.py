"""The upstream client: keep-alive connection pools per target, balancing
among them, connect timeouts, the retry budget.

Theory of operation
-------------------
An ``Upstream`` (one ``[upstreams.NAME]`` table) has one ``TargetPool`` per
target URL and a balancer that picks one for each request. A pool keeps idle
keep-alive connections (LIFO: the warmest first) and counts active ones (for
least-connections balancing). One request and its answer on one connection
is exchange.py's job (``UpstreamConnection``); the bytes of both are the
codec's (``triogate.http.h1client``).

https targets (docs/tls.md): the upstream's one client context (the system's
CAs or ``ca_file``, the host name checked, SNI sent) wraps each new
connection after its TCP connect, within the same ``connect_timeout_seconds``;
the exchange then runs on the ``TLSSocket`` as on a plain socket, and the
connection is pooled and reused like a plain one (no handshake per request).
A certificate that does not verify is a 502 ``UPSTREAM_TLS_ERROR`` with the
reason in its detail, which the pipeline logs once per failed request (a
WARNING, no traceback), counted per target (``tls_failures``) and in the
upstream error metrics by code.

Errors are mapped once, in exchange.py and here: refused/reset/protocol
garbage -> 502 ``BAD_GATEWAY``, no answer within the timeouts -> 504
``UPSTREAM_TIMEOUT``. A pooled connection is checked before reuse (an idle
one that has become readable was closed by the upstream); a request that
still meets a *stale* connection (nothing of the response arrived) is
retried once on a fresh one when its method is idempotent and its body has
not been streamed.

``Upstream.send`` sets ``sent_upstream`` on its ``sink`` (the request's
``Context``) as soon as any byte of the request head has been written to an
upstream socket (a connection that was refused, or a breaker that refused
the target, never sets it). From then on the upstream may act on the
request, so the gateway charges it whatever happens next (CONTRACT §5).
Bytes written to a keep-alive connection that turns out to be stale count
as sent: the gateway cannot know that the upstream did not read them.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import trio

from triogate.config import UpstreamConfig
from triogate.dataplane import sockio
from triogate.dataplane.exchange import SentSink, StaleConnection, UpstreamConnection
from triogate.dataplane.tls import client_context, handshake
from triogate.dataplane.upstreamstats import TargetStatistics, UpstreamStatistics
from triogate.errors import (
    BadGateway,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnavailable,
)
from triogate.http import Body, Response
from triogate.policy.breaker import Breaker, BreakerSettings, FailurePolicy

__all__ = [
    "TargetPool",
    "TargetStatistics",
    "Upstream",
    "UpstreamStatistics",
]

log = logging.getLogger("triogate.dataplane.upstream")

LIVENESS_CHECK_AFTER = 1.0  # seconds idle before a pooled connection is checked
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
MAX_IDLE_PER_TARGET = 256


class RequestSink(SentSink, Protocol):
    """What a request's head is made from and what learns how it went (the
    pipeline's ``Context``): ``sent_upstream`` (charged from then on) and
    ``upstream_seconds``, the time to the answer's head summed over tries."""

    upstream_seconds: float | None


S = TypeVar("S", bound=RequestSink)


class TargetPool:
    """Keep-alive connections to one target (``http://host:port``, or
    ``https://`` with ``tls``, the upstream's client context)."""

    def __init__(
        self, url: str, *, connect_timeout: float, tls: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream target {url!r} (http(s)://host:port only)")
        https = parts.scheme == "https"
        if https and tls is None:
            raise ValueError(f"upstream target {url!r} needs a TLS context")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if https else 80)
        self.tls = tls if https else None
        self.tls_failures = 0
        self.authority = f"{self.host}:{self.port}" if parts.port else self.host
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        # An upstream that stops reading a request body is as good as gone.
        self.send_timeout = 30.0
        self._idle: list[UpstreamConnection] = []
        self.active = 0
        self.opened = 0
        self.closed = False
        # Passive health: set by the circuit-breaker plugin (one per target).
        self.breaker: Breaker | None = None
        self.failure_policy: FailurePolicy = FailurePolicy()
        # Active health: set by the health checker, if the upstream has one.
        self.healthy = True

    def __repr__(self) -> str:
        breaker = f", breaker {self.breaker.state.value}" if self.breaker else ""
        return f"<TargetPool {self.url} {self.active} active, {len(self._idle)} idle{breaker}>"

    def statistics(self) -> TargetStatistics:
        breaker = self.breaker
        return TargetStatistics(
            target=self.url,
            active=self.active,
            idle=len(self._idle),
            opened=self.opened,
            healthy=self.healthy,
            breaker=breaker.snapshot(trio.current_time()) if breaker is not None else None,
            tls_failures=self.tls_failures,
        )

    def usable(self, now: float) -> bool:
        """Healthy (active checks) and not refused by its breaker."""
        return self.healthy and (self.breaker is None or self.breaker.available(now))

    def record(self, now: float, *, status: int | None = None, error: str | None = None) -> None:
        """The outcome of one exchange, for the breaker (if any)."""
        if self.breaker is not None:
            self.breaker.record(self.failure_policy.failed(status, error), now)

    def acquire_nowait(self) -> UpstreamConnection | None:
        """A kept-alive connection when one is at hand, else None (then
        ``acquire`` connects): the common case without a coroutine. The
        clock is the connection's own (bound once; ``idle_since`` is read
        from it), so a request that finds no idle connection reads none."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.now() - conn.idle_since < LIVENESS_CHECK_AFTER or sockio.still_open(conn.sock):
                self.active += 1
                return conn
            conn.close()
        return None

    async def acquire(self, *, fresh: bool = False, now: float | None = None) -> UpstreamConnection:
        self.active += 1
        try:
            if now is None:
                now = trio.current_time()
            while not fresh and self._idle:
                conn = self._idle.pop()
                # A connection used moments ago is alive; one that idled a
                # while is checked (the upstream may have closed it), which
                # costs a system call that reusing a dead one would not save.
                if now - conn.idle_since < LIVENESS_CHECK_AFTER or sockio.still_open(conn.sock):
                    return conn
                conn.close()
            return await self._connect()
        except BaseException:
            self.active -= 1
            raise

    async def _connect(self) -> UpstreamConnection:
        sock = await self.open_socket(self.connect_timeout)
        self.opened += 1
        return UpstreamConnection(sock, self)

    async def open_socket(self, seconds: float) -> socket.socket:
        """A new connection to the target within ``seconds``: TCP, then the
        TLS handshake for https. Raises BadGateway, UpstreamTLSError or
        UpstreamTimeout (the health probes use it too)."""
        deadline = trio.current_time() + seconds
        try:
            sock = await sockio.connect(self.host, self.port, seconds)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"could not connect to {self.authority} within {seconds:g} s"
            ) from None
        except OSError as exc:
            raise BadGateway(
                f"could not connect to upstream {self.authority}: {exc.strerror}"
            ) from exc
        if self.tls is None:
            return sock
        try:
            return await handshake(sock, self.tls, deadline, server_hostname=self.host)
        except TimeoutError:
            raise UpstreamTimeout(
                f"TLS handshake with {self.authority} not done within {seconds:g} s"
            ) from None
        except ssl.SSLError as exc:
            self.tls_failures += 1
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"certificate verify failed: {exc.verify_message}"
            else:
                reason = exc.reason or str(exc)
            raise UpstreamTLSError(f"TLS with upstream {self.authority} failed: {reason}") from None
        except OSError as exc:
            raise BadGateway(
                f"upstream {self.authority} failed during the TLS handshake: {exc}"
            ) from exc

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        self.active -= 1
        if reusable and not self.closed and len(self._idle) < MAX_IDLE_PER_TARGET:
            conn.idle_since = conn.now()
            self._idle.append(conn)
        else:
            conn.close()

    def discard(self, conn: UpstreamConnection) -> None:
        """A connection that failed: count it out without pooling it."""
        self.active -= 1
        conn.close()

    def close(self) -> None:
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


# Balancers: pick one of the usable pools (a subset that changes as
# breakers open and health checks fail). Strategies in a table, as in Kong.
def _round_robin(upstream: Upstream, pools: list[TargetPool]) -> TargetPool:
    upstream.turn += 1
    return pools[upstream.turn % len(pools)]


def _least_connections(upstream: Upstream, pools: list[TargetPool]) -> TargetPool:
    # Ties broken round-robin so equal targets share the load.
    upstream.turn += 1
    start = upstream.turn % len(pools)
    return min(pools[start:] + pools[:start], key=lambda p: p.active)


BALANCERS: dict[str, Callable[[Upstream, list[TargetPool]], TargetPool]] = {
    "round_robin": _round_robin,
    "least_connections": _least_connections,
}


def _tls_context(name: str, config: UpstreamConfig) -> ssl.SSLContext | None:
    """The upstream's client context when a target is https (one for all)."""
    if not any(url.startswith("https://") for url in config.targets):
        return None
    field = f"upstreams.{name}"
    context = client_context(config.ca_file, config.verify, field)  # ConfigError if bad
    if not config.verify:
        log.warning(
            "upstream %s: verify = false, its TLS certificates are NOT checked "
            "(anyone on the path can pose as it); for testing only",
            name,
        )
    return context


class Upstream:
    """One named upstream: its target pools, how to pick among them, and the
    retry budget its routes share."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        tls = _tls_context(name, config)
        self.pools = [
            TargetPool(url, connect_timeout=config.connect_timeout_seconds, tls=tls)
            for url in config.targets
        ]
        for pool in self.pools:
            pool.send_timeout = config.read_timeout_seconds
        self._balance = BALANCERS[config.balance]
        self.turn = -1
        self.in_flight = 0
        self.retries_in_flight = 0

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.config.balance} {self.pools!r}>"

    def statistics(self) -> UpstreamStatistics:
        return UpstreamStatistics(
            name=self.name,
            balance=self.config.balance,
            in_flight=self.in_flight,
            retries_in_flight=self.retries_in_flight,
            targets=tuple(p.statistics() for p in self.pools),
        )

    def pick(self, now: float, avoid: frozenset[str] | set[str] = frozenset()) -> TargetPool:
        """A usable target, preferring those not in ``avoid`` (already
        tried); 503 ``UPSTREAM_UNAVAILABLE`` when none is usable. A breaker
        in half-open state gives the pick one of its probe slots."""
        pools = self.pools
        if len(pools) == 1:
            # One target, healthy, no breaker (the common case): no lists.
            only = pools[0]
            if only.healthy and only.breaker is None:
                return only
        usable = [p for p in pools if p.usable(now)]
        if not usable:
            waits = [p.breaker.retry_after(now) for p in self.pools if p.breaker is not None]
            error = UpstreamUnavailable(f"no healthy target for upstream {self.name}")
            error.headers["Retry-After"] = str(max(1, math.ceil(min(waits, default=1.0))))
            raise error
        fresh = [p for p in usable if p.url not in avoid] if avoid else usable
        pool = self._balance(self, fresh or usable)
        if pool.breaker is not None:
            pool.breaker.allow(now)  # takes the probe slot when half-open
        return pool

    # The plugin API's ``UpstreamView`` (``ctx.upstream``): what the upstream
    # wrappers may see and ask of the live upstream.
    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.config.targets)

    def use_breaker(self, settings: BreakerSettings, failures: FailurePolicy) -> None:
        raise RuntimeError("use_breaker is for bind: breakers change when a config is applied")

    def begin_retry(self, ratio: float, minimum: int) -> bool:
        """May one more retry run? Retries in flight stay under ``ratio`` of
        the requests in flight (at least ``minimum``), so retries cannot
        multiply the load on an upstream that is already failing."""
        if self.retries_in_flight >= max(minimum, ratio * self.in_flight):
            return False
        self.retries_in_flight += 1
        return True

    def end_retry(self) -> None:
        self.retries_in_flight -= 1

    async def send(
        self,
        method: str,
        head_for: Callable[[S, TargetPool], bytes],
        body: Body | None,
        *,
        sink: S,
        tried: set[str] | None = None,
    ) -> Response:
        """One try at one target. The request head is ``head_for(sink,
        pool)``; ``sink.sent_upstream`` turns true once bytes of the request
        have been written to the target, and ``sink.upstream_seconds`` grows
        by the time to the answer's head. (A plain function and the sink
        itself: no closure is made per request.)"""
        started = time.monotonic()
        pools = self.pools
        if len(pools) == 1 and pools[0].healthy and pools[0].breaker is None:
            # ``pick``'s common case without reading trio's clock, which
            # costs more than the rest of the pick (KI protection, frames).
            pool = pools[0]
        else:
            pool = self.pick(trio.current_time(), tried or frozenset())
        if tried is not None:
            tried.add(pool.url)
        self.in_flight += 1
        try:
            head = head_for(sink, pool)
            # The first try inline (no coroutine per layer): a kept-alive
            # connection, else a new one.
            conn = pool.acquire_nowait()
            if conn is None:
                conn = await pool.acquire(fresh=True)
            try:
                response = await conn.exchange(
                    method, head, body, self.config.read_timeout_seconds, sink
                )
            except StaleConnection:
                pool.discard(conn)
                response = await self._again(pool, method, head, body, sink)
            except BaseException:
                pool.discard(conn)
                raise
        except UpstreamTimeout:
            pool.record(trio.current_time(), error="timeout")
            raise
        except BadGateway:
            pool.record(trio.current_time(), error="transport")
            raise
        except trio.Cancelled:
            # Cancelled from outside while the target had the request (a
            # retry's per-try timeout): as far as anyone can tell, too slow.
            pool.record(trio.current_time(), error="timeout")
            raise
        except BaseException:
            # Everything else is the client's doing (it went away, its body
            # was refused or malformed): no verdict on the target.
            if pool.breaker is not None:
                pool.breaker.abandon()
            raise
        finally:
            self.in_flight -= 1
            so_far = sink.upstream_seconds
            sink.upstream_seconds = (so_far or 0.0) + time.monotonic() - started
        if pool.breaker is not None:
            pool.record(trio.current_time(), status=response.status)
        return response

    async def _again(
        self,
        pool: TargetPool,
        method: str,
        head: bytes,
        body: Body | None,
        sink: SentSink,
    ) -> Response:
        """A reused connection died before any byte of the answer: once more
        on a fresh one, when the method allows it."""
        if method not in IDEMPOTENT_METHODS:
            # The upstream may have acted on it before closing: a proxy
            # must not repeat a non-idempotent request on its own
            # (RFC 9110 §9.2.2). The retry plugin decides, with rules.
            raise BadGateway(
                f"upstream {pool.authority} closed a reused connection without answering"
            )
        conn = await pool.acquire(fresh=True)
        try:
            return await conn.exchange(method, head, body, self.config.read_timeout_seconds, sink)
        except StaleConnection:
            pool.discard(conn)
            raise BadGateway(f"upstream {pool.authority} closed the connection twice") from None
        except BaseException:
            pool.discard(conn)
            raise

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
