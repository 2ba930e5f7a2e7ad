"""The data plane as an ASGI app: the second front door to the same pipeline.

For operators who want HTTP/2 or TLS from hypercorn::

    TRIOGATE_CONFIG=triogate.toml hypercorn --worker-class trio triogate.asgi:app

or ``triogate serve --server hypercorn``, which runs hypercorn on the proxy
listener inside the gateway process. Either way requests go through the very
``Pipeline.handle`` the native listener calls; this module only translates
ASGI messages to ``Request``/``Response`` and back. Standalone
(``triogate.asgi:app``), the app's ``opener`` (the runtime's
``open_standalone``) opens the gateway in the ASGI lifespan and runs what
``Server.run`` runs beside its listeners; at lifespan shutdown the actors
flush before storage closes, so credits and usage spent here are kept.

hypercorn parses the HTTP framing, so the native listener's protocol checks
are hypercorn's here; the target checks (``check_target``), the body size
cap and the body timeouts are applied the same way in both: the next piece
of a body within ``body_timeout_seconds``, the whole body within
``body_deadline_seconds`` of the request's head, else 408
``REQUEST_TIMEOUT``. ``max_connections`` is the native listener's only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import trio

from triogate.config import ServerConfig
from triogate.dataplane.pipeline import Pipeline, new_request_id, problem_response
from triogate.errors import (
    ClientDisconnected,
    GatewayError,
    PayloadTooLarge,
    RequestTimeout,
    TriogateError,
)
from triogate.http import (
    Body,
    Headers,
    Request,
    Response,
    check_target,
    strip_connection_headers,
)
from triogate.http.h1frame import CONTENT_LENGTH, FRAMING_HEADERS, NO_BODY, response_framing
from triogate.http.netaddr import client_ip

__all__ = ["GatewayASGI", "Opener"]

log = logging.getLogger("triogate.asgi")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


#: Opens what serves a standalone app's pipeline (the runtime's gateway and
#: its services) and gives the getter of the current pipeline; left when the
#: app's lifespan ends.
Opener = Callable[[], AbstractAsyncContextManager[Callable[[], Pipeline]]]


class GatewayASGI:
    """``get_pipeline`` serves an embedded app (``serve --server hypercorn``:
    the server owns the gateway). Standalone, ``opener`` opens the gateway in
    the lifespan (``triogate.asgi:app``)."""

    def __init__(
        self, get_pipeline: Callable[[], Pipeline] | None = None, *, opener: Opener | None = None
    ) -> None:
        self._get_pipeline = get_pipeline
        self._opener = opener

    def __repr__(self) -> str:
        mode = "standalone" if self._opener is not None else "embedded"
        running = "running" if self._get_pipeline is not None else "not started"
        return f"<GatewayASGI {mode} {running}>"

    def pipeline(self) -> Pipeline:
        if self._get_pipeline is None:
            raise RuntimeError("the ASGI lifespan has not started the gateway")
        return self._get_pipeline()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        if self._opener is None:  # embedded: the server runs everything
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        async with AsyncExitStack() as stack:
            failure: str | None = None
            try:
                get_pipeline = await stack.enter_async_context(self._opener())
            except TriogateError as exc:
                # Refused on purpose (a bad config, a damaged data directory):
                # the message says what to do; a traceback would bury it.
                log.error("triogate failed to start: %s", exc)
                failure = str(exc)
            except Exception as exc:
                log.exception("triogate failed to start")  # a bug: the traceback helps
                failure = str(exc)
            if failure is not None:
                # Outside the except blocks: hypercorn raises from this send
                # (LifespanFailureError), and its report must not chain ours.
                await send({"type": "lifespan.startup.failed", "message": failure})
                return
            self._get_pipeline = get_pipeline
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown: hypercorn has stopped serving
            self._get_pipeline = None
            log.info("stopping; flushing storage")
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        pipeline = self.pipeline()
        method: str = scope["method"]
        version: str = scope.get("http_version", "1.1")
        try:
            request = self._request(scope, receive, pipeline.config.server)
        except GatewayError as exc:
            refusal = problem_response(exc, new_request_id())
            client = scope.get("client") or ("0.0.0.0", 0)
            pipeline.log_refused(method, scope.get("path", "-"), client_ip(client[0]), refusal)
            await self._send(send, refusal, method, version)
            return
        try:
            ctx, response = await pipeline.handle(request)
        except ClientDisconnected:
            return  # nobody left to answer
        try:
            await self._send(send, response, method, version)
        finally:
            await pipeline.after(ctx, response)

    @staticmethod
    def _request(scope: Scope, receive: Receive, server: ServerConfig) -> Request:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("ascii", "strict")
        query_bytes: bytes = scope.get("query_string", b"")
        # The same checks and normalisation as the native listener.
        path, query = check_target(
            raw_path + (b"?" + query_bytes if query_bytes else b""), server.allow_path_parameters
        )
        headers = Headers([(bytes(k).lower(), bytes(v)) for k, v in scope["headers"]])
        strip_connection_headers(headers, server.underscores_in_headers)
        max_body = server.max_request_body_bytes
        length: int | None = None
        raw_length = headers.get_raw(b"content-length")
        if raw_length is not None and raw_length.isdigit():
            length = int(raw_length)
            if length > max_body:
                raise PayloadTooLarge(f"the request body is limited to {max_body} bytes")
        elif headers.get_raw(b"transfer-encoding") is None:
            length = 0
        client = scope.get("client") or ("0.0.0.0", 0)
        # The whole body is due within body_deadline_seconds of the head.
        deadline = trio.current_time() + server.body_deadline_seconds
        return Request(
            method=scope["method"],
            path=path,
            query=query,
            headers=headers,
            body=Body(_body(receive, max_body, server.body_timeout_seconds, deadline), length),
            client_ip=client_ip(client[0]),
            scheme=scope.get("scheme", "http"),
            http_version=scope.get("http_version", "1.1"),
        )

    @staticmethod
    async def _send(send: Send, response: Response, method: str, version: str = "1.1") -> None:
        """``response`` as ASGI messages, framed as the native listener
        frames it (``h1frame.response_framing``): no body for 1xx, 204, 304
        and HEAD, a known length as Content-Length; an unknown length gets
        none, and the ASGI server frames it (chunked, the close, HTTP/2
        frames). ``transfer-encoding`` never passes: the server frames every
        body itself, and HTTP/2 forbids the header."""
        status = response.status
        content = response.content
        body = response.body
        if body is None:
            length: int | None = 0 if content is None else len(content)
        else:
            length = body.length
        framing = response_framing(status, method, version, length)
        raw = response.headers.raw
        if framing is NO_BODY and method == "HEAD":
            # The answer to GET it stands for says how long it would be.
            headers = [(k, v) for k, v in raw if k != b"transfer-encoding"]
        else:
            headers = [(k, v) for k, v in raw if k not in FRAMING_HEADERS]
            if framing is CONTENT_LENGTH:
                assert length is not None  # decided only for a known length
                headers.append((b"content-length", b"%d" % length))
        if framing is NO_BODY:
            if body is not None:
                await body.aclose()
            content, body = None, None
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if body is not None:
                async for chunk in body:
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": content or b"", "more_body": False})
        finally:
            if body is not None:
                await body.aclose()  # give the upstream connection back either way


async def _body(
    receive: Receive, max_body: int, per_read: float, deadline: float
) -> AsyncIterator[bytes]:
    """The request body from ASGI messages: each within ``per_read`` seconds
    of asking, all before ``deadline`` (trio time), else ``RequestTimeout``
    (the pipeline answers it 408: a body is read only before the answer
    begins). hypercorn's ``receive`` is a channel: a cancelled wait loses no
    message."""
    seen = 0
    while True:
        with trio.move_on_at(min(trio.current_time() + per_read, deadline)) as waited:
            message = await receive()
        if waited.cancelled_caught:
            if trio.current_time() >= deadline:
                raise RequestTimeout("the request body did not arrive within body_deadline_seconds")
            raise RequestTimeout("the client was too slow")
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk: bytes = message.get("body", b"")
        seen += len(chunk)
        if seen > max_body:
            raise PayloadTooLarge(f"the request body is limited to {max_body} bytes")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
