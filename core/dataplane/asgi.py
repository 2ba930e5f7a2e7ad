"""The data plane as an ASGI app: the second front door to the same pipeline.

For operators who want HTTP/2 or TLS from hypercorn::

    TRIOGATE_CONFIG=triogate.toml hypercorn --worker-class trio triogate.asgi:app

or ``triogate serve --server hypercorn``, which runs hypercorn on the proxy
listener inside the gateway process. Either way requests go through the very
``Pipeline.handle`` the native listener calls; this module only translates
ASGI messages to ``Request``/``Response`` and back. Standalone, the app opens
the gateway (storage, services, pipeline) in the ASGI lifespan and runs what
``Server.run`` runs beside its listeners (``run_services``: the key actors and
their flushes, the access log, health checks); at lifespan shutdown the actors
flush before storage closes, so credits and usage spent here are kept.

hypercorn parses the HTTP framing, so the native listener's protocol checks
are hypercorn's here; the target checks (``check_target``) and the body size
cap are applied the same way in both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from triogate.config import load_config
from triogate.dataplane.health import run_health_checks
from triogate.dataplane.pipeline import Pipeline, new_request_id, problem_response
from triogate.errors import GatewayError, PayloadTooLarge
from triogate.http import (
    Body,
    ClientDisconnected,
    Headers,
    Request,
    Response,
    check_target,
    strip_connection_headers,
)
from triogate.http.netaddr import client_ip
from triogate.runtime.gateway import Gateway, open_gateway

__all__ = ["GatewayASGI", "app", "run_services"]

log = logging.getLogger("triogate.asgi")

_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_NO_BODY = frozenset({204, 304})

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


async def run_services(
    gw: Gateway, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """What serves next to the listeners, as ``Server.run`` runs it: the key
    actors (their flusher, and a final flush when cancelled), the access log
    writer (drained when cancelled) and the upstream health checks of the
    built pipeline. Runs until cancelled.

    Without them a standalone ASGI gateway spent credits and counted usage
    in memory only, and lost both on stop."""
    async with trio.open_nursery() as tasks:
        await tasks.start(gw.actors.run)
        if gw.access_log is not None:
            await tasks.start(gw.access_log.run)
        await tasks.start(run_health_checks, gw.current_pipeline().upstreams)
        task_status.started()


class GatewayASGI:
    """``get_pipeline`` serves an embedded app (``serve --server hypercorn``);
    without it the app is standalone and builds its gateway in the lifespan
    from ``TRIOGATE_CONFIG`` (or the embedded defaults)."""

    def __init__(self, get_pipeline: Callable[[], Pipeline] | None = None) -> None:
        self._get_pipeline = get_pipeline
        self._gateway: Gateway | None = None

    def __repr__(self) -> str:
        mode = "embedded" if self._get_pipeline else "standalone"
        return f"<GatewayASGI {mode} gateway={self._gateway!r}>"

    def pipeline(self) -> Pipeline:
        if self._get_pipeline is not None:
            return self._get_pipeline()
        if self._gateway is None:
            raise RuntimeError("the ASGI lifespan has not started the gateway")
        return self._gateway.current_pipeline()

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
        if self._get_pipeline is not None:
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = os.environ.get("TRIOGATE_CONFIG")
        async with AsyncExitStack() as stack:
            try:
                config = load_config(Path(path) if path else None)
                gw = await stack.enter_async_context(open_gateway(config, source=path))
                gw.pipeline = gw.build_pipeline()
                stack.callback(gw.current_pipeline().close)
                # Entered last, so left first: the services stop (the final
                # flush included) before the pipeline closes and LMDB does.
                services = await stack.enter_async_context(trio.open_nursery())
                await services.start(run_services, gw)
                stack.callback(services.cancel_scope.cancel)
            except Exception as exc:
                log.exception("triogate failed to start")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            self._gateway = gw
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown: hypercorn has stopped serving
            self._gateway = None
            log.info("stopping; flushing storage")
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        pipeline = self.pipeline()
        method: str = scope["method"]
        try:
            request = self._request(
                scope, receive, pipeline.max_body, pipeline.config.server.underscores_in_headers
            )
        except GatewayError as exc:
            refusal = problem_response(exc, new_request_id())
            client = scope.get("client") or ("0.0.0.0", 0)
            pipeline.log_refused(method, scope.get("path", "-"), client_ip(client[0]), refusal)
            await self._send(send, refusal, method)
            return
        try:
            ctx, response = await pipeline.handle(request)
        except ClientDisconnected:
            return  # nobody left to answer
        try:
            await self._send(send, response, method)
        finally:
            await pipeline.after(ctx, response)

    @staticmethod
    def _request(
        scope: Scope, receive: Receive, max_body: int, underscores: bool = False
    ) -> Request:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("ascii", "strict")
        query_bytes: bytes = scope.get("query_string", b"")
        # The same checks and normalisation as the native listener.
        path, query = check_target(raw_path + (b"?" + query_bytes if query_bytes else b""))
        headers = Headers([(bytes(k).lower(), bytes(v)) for k, v in scope["headers"]])
        strip_connection_headers(headers, underscores)
        length: int | None = None
        raw_length = headers.get_raw(b"content-length")
        if raw_length is not None and raw_length.isdigit():
            length = int(raw_length)
            if length > max_body:
                raise PayloadTooLarge(f"the request body is limited to {max_body} bytes")
        elif headers.get_raw(b"transfer-encoding") is None:
            length = 0
        client = scope.get("client") or ("0.0.0.0", 0)
        return Request(
            method=scope["method"],
            path=path,
            query=query,
            headers=headers,
            body=Body(_body(receive, max_body), length),
            client_ip=client_ip(client[0]),
            scheme=scope.get("scheme", "http"),
            http_version=scope.get("http_version", "1.1"),
        )

    @staticmethod
    async def _send(send: Send, response: Response, method: str) -> None:
        status = response.status
        headers = [(k, v) for k, v in response.headers.raw if k not in _FRAMING]
        content = response.content
        body = response.body
        if status in _NO_BODY:
            content, body = None, None
        elif method == "HEAD":
            length = response.headers.get_raw(b"content-length")
            if length is not None:
                headers.append((b"content-length", length))
            if body is not None:
                await body.aclose()
            content, body = None, None
        elif body is None:
            headers.append((b"content-length", b"%d" % len(content or b"")))
        elif body.length is not None:
            headers.append((b"content-length", b"%d" % body.length))
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


async def _body(receive: Receive, max_body: int) -> AsyncIterator[bytes]:
    seen = 0
    while True:
        message = await receive()
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


app = GatewayASGI()
