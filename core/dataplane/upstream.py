"""The upstream client: keep-alive connection pools per target, responses
parsed with httptools (llhttp), connect/read timeouts, streaming both ways.

Theory of operation
-------------------
An ``Upstream`` (one ``[upstreams.NAME]`` table) has one ``TargetPool`` per
target URL and a balancer that picks one for each request. A pool keeps idle
keep-alive connections (LIFO: the warmest first) and counts active ones (for
least-connections balancing).

``UpstreamConnection.exchange`` writes the request head (and streams the body
with back-pressure), then reads until the response head is parsed. The
response body is handed back as a ``Body`` that keeps reading from the same
socket; when the message is complete the connection goes back to its pool,
and if the consumer abandons the body (client gone) it is closed instead:
a connection with unread bytes on it can never be reused.

The common small response arrives in the same read as its head: then the
response carries ``content`` bytes and the connection is back in the pool
before the gateway writes a byte, which lets the listener send head and body
in one write.

Errors are mapped once, here: refused/reset/protocol garbage -> 502
``BAD_GATEWAY``, no answer within the timeouts -> 504 ``UPSTREAM_TIMEOUT``. A
pooled connection is checked before reuse (an idle one that has become
readable was closed by the upstream); a request that still meets a *stale*
connection (nothing of the response arrived) is retried once on a fresh one
when its method is idempotent and its body has not been streamed.

``Upstream.send`` calls its ``on_sent`` callback as soon as any byte of the
request head has been written to an upstream socket (a connection that was
refused, or a breaker that refused the target, never calls it). From then on
the upstream may act on the request, so the gateway charges it whatever
happens next (CONTRACT §5). Bytes written to a keep-alive connection that
turns out to be stale count as sent: the gateway cannot know that the
upstream did not read them.
"""

from __future__ import annotations

import collections
import math
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import msgspec
import trio

from triogate.config import UpstreamConfig
from triogate.dataplane import sockio
from triogate.errors import GatewayError
from triogate.http import Body, Headers, Response
from triogate.policy.breaker import Breaker

__all__ = [
    "BadGateway",
    "TargetPool",
    "Upstream",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]

READ_SIZE = 65536
LIVENESS_CHECK_AFTER = 1.0  # seconds idle before a pooled connection is checked
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
MAX_IDLE_PER_TARGET = 256
MAX_RESPONSE_HEAD_BYTES = 65536


class UpstreamError(GatewayError):
    """An upstream failed. Its ``detail`` names hosts and ports: it goes to
    the log (with the request id), and clients get ``public_detail``."""

    public_detail = "the upstream failed"


class BadGateway(UpstreamError):
    status = 502
    code = "BAD_GATEWAY"
    title = "Bad Gateway"
    public_detail = "the upstream could not be reached or broke the protocol"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "UPSTREAM_UNAVAILABLE"
    title = "Service Unavailable"
    public_detail = "no healthy upstream target right now; see Retry-After"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "UPSTREAM_TIMEOUT"
    title = "Gateway Timeout"
    public_detail = "the upstream did not answer in time"


class _StaleConnection(Exception):
    """The connection died before any byte of the response: safe to retry."""


class _ResponseParser:
    """httptools callbacks for one response."""

    __slots__ = (
        "body",
        "complete",
        "head_bytes",
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
        (llhttp itself is ready once the previous message completed)."""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.body: collections.deque[bytes] = collections.deque()
        self.status = 0
        self.head_bytes = 0
        self.skip_body = skip_body
        self.keep_alive = False
        self.interim = False

    def on_message_begin(self) -> None:
        if self.interim:
            # The final response after a 1xx interim one (100 Continue,
            # 103 Early Hints): forget the interim one's headers.
            self.interim = False
            self.headers = []
            self.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise BadGateway("upstream response headers are too large")
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


class UpstreamConnection:
    __slots__ = ("idle_since", "parsed", "pool", "requests", "returned", "sock")

    def __init__(self, sock: socket.socket, pool: TargetPool) -> None:
        self.sock = sock
        self.pool = pool
        self.requests = 0
        self.idle_since = 0.0
        self.returned = True  # no exchange under way
        self.parsed: _ResponseParser | None = None

    def __repr__(self) -> str:
        return f"<UpstreamConnection to {self.pool.authority} after {self.requests} requests>"

    def close(self) -> None:
        sockio.close(self.sock)

    async def _send_all(self, data: bytes | memoryview) -> None:
        await sockio.send_all(self.sock, data, self.pool.send_timeout)

    async def _recv(self, read_timeout: float) -> bytes | None:
        """The next bytes from the upstream, or None after ``read_timeout``."""
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError:
            pass
        return await sockio.recv(self.sock, READ_SIZE, trio.current_time() + read_timeout)

    async def _send_head(self, head: bytes, on_sent: Callable[[], None] | None) -> None:
        """Write the head, telling ``on_sent`` once any byte of it is in the
        kernel's hands (one direct ``send`` first: only it can tell a
        partial write from none when the connection then fails)."""
        try:
            sent = self.sock.send(head)
        except BlockingIOError:
            sent = 0
        if sent and on_sent is not None:
            on_sent()
        if sent < len(head):
            await self._send_all(memoryview(head)[sent:])
            if on_sent is not None:
                on_sent()

    async def exchange(
        self,
        method: str,
        head: bytes,
        body: Body | None,
        read_timeout: float,
        on_sent: Callable[[], None] | None = None,
    ) -> Response:
        """Send one request and return the response (body still streaming)."""
        self.requests += 1
        generation = self.requests
        self.returned = False
        reused = self.requests > 1
        try:
            await self._send_head(head, on_sent)
            if body is not None and body.length != 0:
                if body.length is not None:
                    async for chunk in body:
                        await self._send_all(chunk)
                else:
                    async for chunk in body:
                        if chunk:
                            await self._send_all(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await self._send_all(b"0\r\n\r\n")
        except OSError as exc:
            self.close()
            if reused and (body is None or not body.consumed):
                raise _StaleConnection() from exc
            raise BadGateway(f"upstream connection failed while sending: {exc}") from exc

        # A body already streamed cannot be sent again on a new connection.
        replayable = body is None or not body.consumed
        skip_body = method == "HEAD"
        parsed = self.parsed
        if parsed is None or parsed.skip_body:
            # A fresh parser the first time, and after a response to HEAD:
            # llhttp was told nothing of that one's missing body.
            parsed = self.parsed = _ResponseParser(skip_body)
        else:
            parsed.reset(skip_body)
        received_any = False
        try:
            while not parsed.headers_done:
                data = await self._recv(read_timeout)
                if data is None:
                    self.close()
                    raise UpstreamTimeout(f"upstream sent no response within {read_timeout:g} s")
                if not data:
                    self.close()
                    if not received_any and reused and replayable:
                        raise _StaleConnection()
                    raise BadGateway("upstream closed the connection before responding")
                received_any = True
                parsed.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops at a complete 101 head with bytes after it (the
            # new protocol's); its head is in, and is refused just below.
            pass
        except httptools.HttpParserError as exc:
            self.close()
            raise BadGateway(f"upstream broke the HTTP protocol: {exc}") from exc
        except OSError as exc:
            self.close()
            if not received_any and reused and replayable:
                raise _StaleConnection() from exc
            raise BadGateway(f"upstream connection failed: {exc}") from exc

        status = parsed.status
        if status == 101:
            # A protocol switch the gateway did not ask for.
            self.close()
            raise BadGateway("upstream switched protocols unasked")
        headers = Headers(parsed.headers)
        keep_alive = parsed.keep_alive
        if parsed.complete:
            content = b"".join(parsed.body)
            self._give_back(keep_alive)
            return Response(status, headers, content=content)
        length_raw = headers.get_raw(b"content-length")
        length = int(length_raw) if length_raw is not None and length_raw.isdigit() else None
        return Response(
            status,
            headers,
            body=Body(
                self._stream(parsed, read_timeout, keep_alive, generation),
                length,
                on_close=lambda: self._give_back(False, generation),
            ),
        )

    async def _stream(
        self, parsed: _ResponseParser, read_timeout: float, keep_alive: bool, generation: int
    ) -> AsyncIterator[bytes]:
        done = False
        try:
            while True:
                while parsed.body:
                    yield parsed.body.popleft()
                if parsed.complete:
                    done = True
                    return
                try:
                    data = await self._recv(read_timeout)
                except OSError as exc:
                    raise BadGateway(f"upstream connection failed mid-body: {exc}") from exc
                if data is None:
                    raise UpstreamTimeout("upstream stalled while sending the body")
                if not data:
                    # Close-delimited body (no length, no chunking) ends here.
                    if parsed.keep_alive or not self._close_delimited(parsed):
                        raise BadGateway("upstream closed the connection mid-body")
                    keep_alive = False
                    done = True
                    return
                try:
                    parsed.parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    raise BadGateway(f"upstream broke the HTTP protocol: {exc}") from exc
        finally:
            self._give_back(done and keep_alive, generation)

    def _give_back(self, reusable: bool, generation: int | None = None) -> None:
        """Return the connection after an answer, once only, and only for
        the exchange that took it (``generation``): a late close of an old
        answer's body must not hand back a connection now serving another."""
        if generation is not None and generation != self.requests:
            return
        if not self.returned:
            self.returned = True
            self.pool.release(self, reusable=reusable)

    @staticmethod
    def _close_delimited(parsed: _ResponseParser) -> bool:
        headers = Headers(parsed.headers)
        return (
            headers.get_raw(b"content-length") is None
            and headers.get_raw(b"transfer-encoding") is None
        )


class TargetPool:
    """Keep-alive connections to one target (``http://host:port``)."""

    def __init__(self, url: str, *, connect_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"unsupported upstream target {url!r} (http://host:port only)")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
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
        self.breaker_bound = False  # bound by a plugin of the config being built
        # Active health: set by the health checker, if the upstream has one.
        self.healthy = True

    def __repr__(self) -> str:
        breaker = f", breaker {self.breaker.state.value}" if self.breaker else ""
        return f"<TargetPool {self.url} {self.active} active, {len(self._idle)} idle{breaker}>"

    def statistics(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "target": self.url,
            "active": self.active,
            "idle": len(self._idle),
            "opened": self.opened,
            "healthy": self.healthy,
            "breaker": (
                msgspec.structs.asdict(self.breaker.snapshot(now))
                if self.breaker is not None
                else None
            ),
        }

    def usable(self, now: float) -> bool:
        """Healthy (active checks) and not refused by its breaker."""
        return self.healthy and (self.breaker is None or self.breaker.available(now))

    def record(self, now: float, *, status: int | None = None, error: str | None = None) -> None:
        """The outcome of one exchange, for the breaker (if any)."""
        if self.breaker is not None:
            self.breaker.record(self.failure_policy.failed(status, error), now)

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
        try:
            sock = await sockio.connect(self.host, self.port, self.connect_timeout)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"could not connect to {self.authority} within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise BadGateway(
                f"could not connect to upstream {self.authority}: {exc.strerror}"
            ) from exc
        self.opened += 1
        return UpstreamConnection(sock, self)

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        self.active -= 1
        if reusable and not self.closed and len(self._idle) < MAX_IDLE_PER_TARGET:
            conn.idle_since = trio.current_time()
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


class FailurePolicy(msgspec.Struct, frozen=True):
    """What counts as a failure for a breaker: by default transport errors,
    timeouts and any 5xx status."""

    statuses: frozenset[int] = frozenset()  # empty: every 5xx
    transport_errors: bool = True
    timeouts: bool = True

    def failed(self, status: int | None, error: str | None) -> bool:
        if error == "timeout":
            return self.timeouts
        if error is not None:
            return self.transport_errors
        assert status is not None
        return status in self.statuses if self.statuses else status >= 500


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


class Upstream:
    """One named upstream: its target pools, how to pick among them, and the
    retry budget its routes share."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.pools = [
            TargetPool(url, connect_timeout=config.connect_timeout_seconds)
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

    def statistics(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "balance": self.config.balance,
            "in_flight": self.in_flight,
            "retries_in_flight": self.retries_in_flight,
            "targets": [p.statistics() for p in self.pools],
        }

    def pick(self, now: float, avoid: frozenset[str] | set[str] = frozenset()) -> TargetPool:
        """A usable target, preferring those not in ``avoid`` (already
        tried); 503 ``UPSTREAM_UNAVAILABLE`` when none is usable. A breaker
        in half-open state gives the pick one of its probe slots."""
        usable = [p for p in self.pools if p.usable(now)]
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
        head_for: Callable[[TargetPool], bytes],
        body: Body | None,
        *,
        tried: set[str] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> Response:
        """One try at one target. ``on_sent`` is called (maybe more than
        once) when bytes of the request have been written to it."""
        now = trio.current_time()
        pool = self.pick(now, tried or frozenset())
        if tried is not None:
            tried.add(pool.url)
        self.in_flight += 1
        try:
            response = await self._exchange(pool, method, head_for(pool), body, now, on_sent)
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
        if pool.breaker is not None:
            pool.record(trio.current_time(), status=response.status)
        return response

    async def _exchange(
        self,
        pool: TargetPool,
        method: str,
        head: bytes,
        body: Body | None,
        now: float,
        on_sent: Callable[[], None] | None,
    ) -> Response:
        timeout = self.config.read_timeout_seconds
        conn = await pool.acquire(now=now)
        try:
            return await conn.exchange(method, head, body, timeout, on_sent)
        except _StaleConnection:
            pool.discard(conn)
            if method not in IDEMPOTENT_METHODS:
                # The upstream may have acted on it before closing: a proxy
                # must not repeat a non-idempotent request on its own
                # (RFC 9110 §9.2.2). The retry plugin decides, with rules.
                raise BadGateway(
                    f"upstream {pool.authority} closed a reused connection without answering"
                ) from None
        except BaseException:
            pool.discard(conn)
            raise
        conn = await pool.acquire(fresh=True)
        try:
            return await conn.exchange(method, head, body, timeout, on_sent)
        except _StaleConnection:
            pool.discard(conn)
            raise BadGateway(f"upstream {pool.authority} closed the connection twice") from None
        except BaseException:
            pool.discard(conn)
            raise

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
