"""The admin API as a quart-trio app, served by hypercorn on the admin listener.

This module is the boundary: it authenticates, authorises and validates from
the endpoint table, calls the handler, and translates every ``GatewayError``
(and werkzeug's own 404/405/413) into problem+json. Anything else is a bug:
logged with the request id, answered 500 INTERNAL_ERROR without a traceback.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import msgspec
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed

from triogate.admin.accesslog import log_admin_request
from triogate.admin.backend import AdminBackend
from triogate.admin.endpoints import ENDPOINTS, Call, Endpoint, Raw
from triogate.admin.openapi import build_openapi
from triogate.control.audit import Actor
from triogate.control.permissions import grants
from triogate.errors import (
    Forbidden,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    ValidationError,
)
from triogate.http.netaddr import client_ip
from triogate.validation import convert_all, decode_json_object

__all__ = ["MAX_ADMIN_BODY_BYTES", "DrainUnreadBody", "create_admin_app"]

log = logging.getLogger("triogate.admin")

MAX_ADMIN_BODY_BYTES = 1 << 20
ADMIN_REALM = "triogate-admin"
# The last piece of an admin answer, then the close or keep-alive bookkeeping.
FINAL_SEND_SECONDS = 5.0
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_encoder = msgspec.json.Encoder()


def _json(body: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(_encoder.encode(body), status=status, content_type=content_type)


def _request_id() -> str:
    rid: str | None = getattr(g, "request_id", None)
    return rid or "-"


def problem_response(error: GatewayError) -> Response:
    if isinstance(error, Unauthorized):
        error.challenge(ADMIN_REALM)
    g.problem_code = error.code  # the access log's outcome
    response = _json(error.problem(_request_id()), error.status, "application/problem+json")
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or None


def _view(gw: AdminBackend, ep: Endpoint) -> Any:
    async def view(**params: str) -> Response:
        # An IPv4 client of a dual-stack ("[::]") admin listener is IPv4.
        remote = request.remote_addr
        source_ip = client_ip(remote) if remote else None
        actor = Actor("anonymous", source_ip)
        permissions: tuple[str, ...] = ()
        if ep.permission is not None:
            principal = gw.admins.authenticate(_bearer())
            if not grants(principal.permissions, ep.permission):
                raise Forbidden(
                    f"this admin lacks {ep.permission}", required_permission=ep.permission
                )
            actor = Actor(principal.id, source_ip)
            g.admin_id = principal.id  # the access log's key_id
            permissions = principal.permissions
        if ep.precheck is not None:
            ep.precheck(gw)
        query = None
        if ep.query is not None:
            raw_query = {k: request.args.get(k) for k in request.args}
            query = convert_all(raw_query, ep.query, strict=False)
        body = None
        if ep.request is not None:
            raw = await request.get_data(as_text=False)
            assert isinstance(raw, bytes)
            body = convert_all(decode_json_object(raw), ep.request)
        call = Call(actor=actor, params=params, body=body, query=query, permissions=permissions)
        result = await ep.handler(gw, call)
        if isinstance(result, Raw):
            return Response(result.body, status=ep.status, content_type=result.content_type)
        return _json(result, ep.status)

    view.__name__ = ep.name
    return view


class DrainUnreadBody:
    """ASGI middleware: after the app has answered, read and drop whatever
    request body it left unread.

    hypercorn (0.18) feeds the body to the app through a bounded queue that
    nobody closes when the app returns; an app that answered early (a 413, a
    401) leaves it full, and the connection task blocks forever. Draining
    here keeps the connection usable; a refused oversized body is answered
    with ``Connection: close``, so the drain ends as soon as the answer is out.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        finished = False

        async def shielded_send(message: Any) -> None:
            # hypercorn ends the exchange from inside the app's last send:
            # it tells the app the stream is over (http.disconnect), then
            # closes the socket (Connection: close) or marks the connection
            # idle (keep-alive timeout). quart-trio cancels the app on that
            # disconnect, which cancelled the close half-way: a client that
            # asked for Connection: close waited for the idle timeout. So the
            # last send runs shielded (bounded: it only has a few bytes left).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(FINAL_SEND_SECONDS) as final:
                    final.shield = True
                    await send(message)
                return
            await send(message)

        async def tracked_receive() -> Any:
            nonlocal finished
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                finished = True
            return message

        await self.app(scope, tracked_receive, shielded_send)
        while not finished:
            await tracked_receive()


def create_admin_app(gw: AdminBackend) -> QuartTrio:
    app = QuartTrio("triogate.admin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_ADMIN_BODY_BYTES
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    openapi = _encoder.encode(build_openapi())

    for ep in ENDPOINTS:
        rule = re.sub(r"\{(\w+)\}", r"<\1>", ep.path)
        app.add_url_rule(rule, endpoint=ep.name, view_func=_view(gw, ep), methods=[ep.method])

    async def openapi_json() -> Response:
        return Response(openapi, content_type="application/json")

    app.add_url_rule("/openapi.json", endpoint="openapi", view_func=openapi_json, methods=["GET"])
    # The console (/ui) is built on this table; imported here, not at the top:
    # it imports the admin package itself.
    from triogate.console import install_console

    install_console(app, gw)

    @app.before_request
    async def assign_request_id() -> None:
        sent = request.headers.get("X-Request-ID", "")
        g.request_id = sent if _REQUEST_ID_RE.match(sent) else uuid.uuid4().hex
        g.started = time.monotonic()

    @app.after_request
    async def add_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = _request_id()
        response.headers.setdefault("Cache-Control", "no-store")
        log_admin_request(
            gw.metrics.access_log,
            request_id=_request_id(),
            method=request.method,
            path=request.path,
            status=response.status_code,
            problem_code=getattr(g, "problem_code", None),
            admin_id=getattr(g, "admin_id", None),
            remote=request.remote_addr,
            started=getattr(g, "started", time.monotonic()),
        )
        return response

    @app.errorhandler(GatewayError)
    async def gateway_error(error: GatewayError) -> Response:
        return problem_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        mapped: GatewayError
        if isinstance(error, WerkzeugMethodNotAllowed):
            mapped = MethodNotAllowed(sorted(error.valid_methods or ()), "method not allowed here")
        elif error.code == 404:
            mapped = NotFound(f"no admin endpoint {request.path}")
        elif error.code == 413:
            mapped = PayloadTooLarge(
                f"admin request bodies are limited to {MAX_ADMIN_BODY_BYTES} bytes"
            )
            mapped.headers["Connection"] = "close"
        elif error.code is not None and 400 <= error.code < 500:
            mapped = ValidationError.single("$", error.description or "bad request")
        else:
            mapped = InternalError()
        return problem_response(mapped)

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        log.exception("internal error", extra={"request_id": _request_id()})
        return problem_response(InternalError("an internal error occurred; it has been logged"))

    return app
