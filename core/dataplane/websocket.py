"""WebSocket upgrades on the native listener: from the upgrade request to the
relay (docs/websockets.md).

The connection hands an upgrade over here (``serve_upgrade``) when llhttp
stops at one: only then, so a plain request never pays for any of this.
What happens, in order:

1. Not a WebSocket upgrade (``h2c``, ``CONNECT``), or one pipelined behind
   other requests: 400 ``BAD_REQUEST`` as before. A handshake RFC 6455
   refuses (``Sec-WebSocket-Key`` not 16 bytes of base64, a version other
   than 13, a body): 400 ``INVALID_WEBSOCKET_HANDSHAKE``, before anything
   else runs (no upstream connection, nothing charged).
2. The access phase, as for any request (``admit``, which follows
   ``Pipeline.handle`` step for step: route match, every access phase,
   response phases, ``finish_headers``; what the access phase took is given
   back when the upgrade is refused before the upstream had a byte). A
   route with ``websocket = false``: 400 ``WEBSOCKET_DISABLED``. The
   upstream wrappers (retry, circuit breaker) do not wrap an upgrade: it is
   never retried, and a target's breaker is asked and told as usual.
3. A fresh upstream connection (never one from the keep-alive pool: it
   becomes the WebSocket's own) gets the request with the gateway's
   forwarding headers (``X-Forwarded-*``, ``X-Request-ID``, ``X-Key-ID``) and
   the upgrade headers. A ``101`` that switches to WebSocket for this key is
   relayed; any other answer goes back as a normal response and the
   connection closes after it.
4. The log phase runs once, when the upgrade is answered: usage counts the
   upgrade as one request, the access log has its line with status 101.
5. The relay (wsrelay.py) pipes the bytes both ways until either side
   closes, the route's idle timeout, a frame over the cap, or shutdown.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httptools
import trio

from triogate.config_websocket import WebSocketConfig, websocket_settings
from triogate.dataplane import sockio
from triogate.dataplane.messages import (
    finish_headers,
    problem_response,
    shutdown_response,
    upstream_head,
)
from triogate.dataplane.pipeline import RECORD_CANCELLED_SECONDS, Pipeline
from triogate.dataplane.upstream import TargetPool
from triogate.dataplane.wsrelay import Relay
from triogate.dataplane.wsstats import STATS
from triogate.errors import (
    BadGateway,
    BadRequest,
    ClientDisconnected,
    GatewayError,
    InternalError,
    UpstreamError,
    UpstreamTimeout,
    WebSocketDisabled,
)
from triogate.http import Body, Headers, Request, Response
from triogate.http.h1client import MAX_RESPONSE_HEAD_BYTES, ResponseParser
from triogate.http.wshandshake import (
    check_client_handshake,
    is_websocket_upgrade,
    switch_problem,
    upgrade_request_head,
)
from triogate.plugins.contract import Context
from triogate.policy.router import Match
from triogate.telemetry.records import CLIENT_CLOSED

if TYPE_CHECKING:
    from triogate.dataplane.connection import Connection

__all__ = ["Link", "admit", "serve_upgrade"]

log = logging.getLogger("triogate.dataplane.websocket")

READ_SIZE = 65536
SWITCHED = (b"upgrade", b"websocket"), (b"connection", b"upgrade")


class Link:
    """An upstream that switched to WebSocket: its socket, the bytes of the
    new protocol that came with its 101, and the route's settings. Until
    closed it counts as an active connection of its target (``pool``), so
    ``least_connections`` sees the WebSockets a target holds."""

    __slots__ = ("pool", "rest", "settings", "sock")

    def __init__(
        self, sock: socket.socket, rest: bytes, settings: WebSocketConfig, pool: TargetPool
    ) -> None:
        self.sock = sock
        self.rest = rest
        self.settings = settings
        self.pool: TargetPool | None = pool
        pool.active += 1

    def close(self) -> None:
        """Close the socket and stop counting (once, whoever calls first)."""
        sockio.close(self.sock)
        if self.pool is not None:
            self.pool.active -= 1
            self.pool = None


async def serve_upgrade(conn: Connection, rest: bytes) -> None:
    """An upgrade request whose head llhttp stopped at, on ``conn``;
    ``rest`` is what the client sent after that head. Returns when the
    connection is to be closed (always: after an upgrade, llhttp will read
    no further request on it)."""
    parsed = conn.parsed
    ready = parsed.ready
    pending = ready[-1] if ready else parsed.current
    if len(ready) != 1 or pending is None or not is_websocket_upgrade(pending.headers):
        await conn.send_error(BadRequest("protocol upgrades are not supported"), pending)
        return
    ready.clear()
    try:
        key = check_client_handshake(
            pending.method, pending.version, pending.headers, pending.body_bytes
        )
        request = conn._request(pending)
    except GatewayError as exc:
        STATS.answered(exc.status, True)
        await conn.send_error(exc, pending)
        return
    listener = conn.listener
    pipeline = listener.get_pipeline()
    listener.in_flight += 1
    link: Link | None = None
    try:
        ctx, response, link = await admit(pipeline, request, key)
        try:
            if link is not None:
                response.headers.raw.extend(SWITCHED)
            await conn._send_response(response, "GET", "1.1", keep_alive=link is not None)
        finally:
            STATS.answered(response.status, response.from_gateway)
            logging_left = pipeline.finish(ctx, response)
            if logging_left is not None:
                await logging_left
    except BaseException:
        # The 101 could not be sent, or the log phase was cancelled
        # (shutdown): the relay never starts, the upstream is let go.
        if link is not None:
            link.close()
        raise
    finally:
        listener.in_flight -= 1
    if link is not None:
        await _relay(conn, link, rest)


async def _relay(conn: Connection, link: Link, rest: bytes) -> None:
    listener = conn.listener
    # Shutdown closes idle connections by waking what waits on them: a
    # relay waiting for its client is woken the same way, and ends with
    # close 1001 to both sides.
    conn.idle = True
    STATS.open += 1
    relay = Relay(conn.sock, link.sock, link.settings, lambda: listener.closing)
    try:
        ending = await relay.run(rest, link.rest)
        await relay.linger()
    finally:
        STATS.open -= 1
        if relay.ending is not None:
            STATS.ended[relay.ending.value] += 1
        link.close()
        conn.idle = False
    log.debug("websocket from %s ended: %s", conn.client_ip, ending.value)


async def admit(
    pipeline: Pipeline, request: Request, key: bytes
) -> tuple[Context, Response, Link | None]:
    """``Pipeline.handle`` for an upgrade: the same steps, with the
    upgrade's upstream call in place of ``Pipeline._proxy``. The answer, and
    the switched upstream when it is a 101. Every call that returns must be
    followed by ``pipeline.finish``; on ClientDisconnected or cancellation
    the request is logged here, as ``handle`` does."""
    pipeline.requests += 1
    pipeline.in_flight += 1
    ctx = pipeline._context(request)
    link: Link | None = None
    try:
        chain = pipeline.global_chain
        match: Match | None = None
        try:
            chain, match = pipeline._route(ctx, request)
            route = pipeline.config.routes[match.route.index]
            settings = websocket_settings(route.websocket)
            if settings is None:
                raise WebSocketDisabled(f"route {route.name!r} does not accept WebSocket upgrades")
            response = None
            for access in chain.access:
                response = access(ctx)
                if response is not None:
                    if not isinstance(response, Response):
                        response = await response
                        if response is None:
                            continue
                    break
            if response is None:
                response, link = await _handshake(pipeline, ctx, key, settings)
        except ClientDisconnected:
            raise
        except UpstreamError as exc:
            log.warning("request %s: %s: %s", ctx.request_id, exc.code, exc.detail)
            exc.detail = exc.public_detail
            response = problem_response(exc, ctx.request_id)
        except GatewayError as exc:
            response = problem_response(exc, ctx.request_id)
        except Exception:
            log.exception("internal error in upgrade request %s", ctx.request_id)
            response = problem_response(InternalError("an internal error occurred"), ctx.request_id)
        if chain.response:
            response = await pipeline._response_phases(ctx, chain, response)
        if link is not None and response.status != 101:
            link.close()  # a response phase turned the 101 into an error
            link = None
        if ctx.undo and response.from_gateway and response.status >= 400 and not ctx.sent_upstream:
            pipeline._undo(ctx)
        finish_headers(ctx, response, match)
        return ctx, response, link
    except ClientDisconnected:
        if link is not None:
            link.close()
        if not ctx.sent_upstream:
            pipeline._undo(ctx)
        await pipeline.after(ctx, Response(CLIENT_CLOSED, from_gateway=True))
        raise
    except BaseException:
        if link is not None:
            link.close()
        if not ctx.sent_upstream:
            pipeline._undo(ctx)
            pipeline._done()
            raise
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + RECORD_CANCELLED_SECONDS
            await pipeline.after(ctx, shutdown_response(ctx.request_id))
        raise


async def _handshake(
    pipeline: Pipeline, ctx: Context, key: bytes, settings: WebSocketConfig
) -> tuple[Response, Link | None]:
    """The upgrade on a fresh connection to a target of the route's
    upstream: its answer, and the link when it is a 101."""
    route = ctx.route
    assert route is not None
    upstream = pipeline.upstreams[route.upstream]
    started = time.monotonic()
    pool = upstream.pick(trio.current_time())
    head = upgrade_request_head(upstream_head(ctx, pool))
    upstream.in_flight += 1
    try:
        # A fresh connection (never a pooled one; TLS for an https target):
        # it becomes the WebSocket's own and never goes back to the pool.
        sock = (await pool._connect()).sock
        try:
            response, rest = await _exchange(
                sock, head, key, ctx, upstream.config.read_timeout_seconds, pool
            )
        except BaseException:
            sockio.close(sock)
            raise
    except UpstreamTimeout:
        pool.record(trio.current_time(), error="timeout")
        raise
    except UpstreamError:  # refused, reset, TLS, a bad 101
        pool.record(trio.current_time(), error="transport")
        raise
    except BaseException:
        if pool.breaker is not None:
            pool.breaker.abandon()  # the client's doing: no verdict on the target
        raise
    finally:
        upstream.in_flight -= 1
        ctx.upstream_seconds = (ctx.upstream_seconds or 0.0) + time.monotonic() - started
    pool.record(trio.current_time(), status=response.status)
    if response.status == 101:
        return response, Link(sock, rest, settings, pool)
    return response, None


async def _exchange(
    sock: socket.socket,
    head: bytes,
    key: bytes,
    ctx: Context,
    read_timeout: float,
    pool: TargetPool,
) -> tuple[Response, bytes]:
    """Send the upgrade, read the answer's head: a checked 101 and the bytes
    after it, or another answer (its body streamed from ``sock``, which is
    closed when it ends)."""
    try:
        await sockio.send_all(sock, head, pool.send_timeout)
    except OSError as exc:  # TimeoutError included: the upstream does not read
        raise BadGateway(f"upstream connection failed while sending: {exc}") from exc
    ctx.sent_upstream = True  # charged from here on (CONTRACT §5)
    parsed = ResponseParser(False)
    received = 0
    rest = b""
    deadline = trio.current_time() + read_timeout
    try:
        while not parsed.headers_done:
            data = await sockio.recv(sock, READ_SIZE, deadline)
            if data is None:
                raise UpstreamTimeout(f"upstream sent no response within {read_timeout:g} s")
            if not data:
                raise BadGateway("upstream closed the connection before responding")
            received += len(data)
            try:
                parsed.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                rest = data[exc.args[0] :]  # llhttp stops after a 101's head
                break
            if not parsed.headers_done and received > MAX_RESPONSE_HEAD_BYTES:
                raise BadGateway("upstream response headers are too large")
    except httptools.HttpParserError as exc:
        raise BadGateway(f"upstream broke the HTTP protocol: {exc}") from exc
    except (OSError, trio.ClosedResourceError) as exc:
        raise BadGateway(f"upstream connection failed: {exc}") from exc
    headers = Headers(parsed.headers)
    if parsed.status == 101:
        problem = switch_problem(parsed.headers, key)
        if problem is not None:
            raise BadGateway(problem)
        return Response(101, headers), rest
    if parsed.complete:
        sockio.close(sock)
        return Response(parsed.status, headers, content=b"".join(parsed.body)), b""
    raw = headers.get_raw(b"content-length")
    length = int(raw) if raw is not None and raw.isdigit() else None
    body = Body(_stream(sock, parsed, read_timeout), length, on_close=lambda: sockio.close(sock))
    return Response(parsed.status, headers, body=body), b""


async def _stream(
    sock: socket.socket, parsed: ResponseParser, read_timeout: float
) -> AsyncIterator[bytes]:
    """The rest of a non-101 answer's body (the socket is closed after)."""
    try:
        while True:
            while parsed.body:
                yield parsed.body.popleft()
            if parsed.complete:
                return
            try:
                data = await sockio.recv(sock, READ_SIZE, trio.current_time() + read_timeout)
            except OSError as exc:
                raise BadGateway(f"upstream connection failed mid-body: {exc}") from exc
            if data is None:
                raise UpstreamTimeout("upstream stalled while sending the body")
            if not data:
                if parsed.close_delimited():
                    return
                raise BadGateway("upstream closed the connection mid-body")
            try:
                parsed.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise BadGateway(f"upstream broke the HTTP protocol: {exc}") from exc
    finally:
        sockio.close(sock)
