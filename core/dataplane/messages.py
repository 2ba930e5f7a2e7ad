"""The messages the data plane makes itself: request ids, problem+json
answers, the head a request goes upstream with, and the headers every
answer gets last. Plain functions over typed data, shared by the pipeline
and both front doors."""

from __future__ import annotations

import functools
import itertools
import os
import re

import msgspec

from triogate.dataplane.upstream import TargetPool
from triogate.errors import GatewayError, Problem
from triogate.http import HOP_BY_HOP, Headers, Response
from triogate.http.h1client import proxy_request_head
from triogate.plugins.contract import Context
from triogate.policy.ratelimit import headers_for
from triogate.policy.router import Match

__all__ = [
    "REQUEST_ID_RE",
    "SHUTDOWN_OUTCOME",
    "SHUTDOWN_STATUS",
    "finish_headers",
    "new_request_id",
    "problem_response",
    "shutdown_response",
    "upstream_head",
]

# A request cancelled after the upstream had it (the shutdown grace period
# ended): charged, so logged and counted as 503 with outcome ``shutdown``
# (nothing is sent: the connection is closed).
SHUTDOWN_STATUS = 503
SHUTDOWN_OUTCOME = "shutdown"

REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_problem_encoder = msgspec.json.Encoder()
_PROBLEM_CT = (b"content-type", b"application/problem+json")


# Request ids: a random per-process prefix and a counter. Unique without a
# getrandom() system call per request (ids need not be secret, only unique).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def problem_response(error: GatewayError, request_id: str) -> Response:
    headers = Headers([_PROBLEM_CT])
    for name, value in error.headers.items():
        headers.raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    response = Response(
        error.status,
        headers,
        content=_problem_encoder.encode(error.problem(request_id)),
        from_gateway=True,
    )
    response.problem = Problem(error.code, request_id)
    return response


def shutdown_response(request_id: str) -> Response:
    response = Response(SHUTDOWN_STATUS, from_gateway=True)
    response.problem = Problem(SHUTDOWN_OUTCOME, request_id)  # the record's outcome
    return response


@functools.lru_cache(maxsize=256)
def _deprecation_raw(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """A version's deprecation headers as they go out: encoded once per
    version (the router shares one tuple per version), not per request."""
    return tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)


@functools.lru_cache(maxsize=64)
def _drop_for(connection: bytes) -> frozenset[bytes]:
    """The hop-by-hop headers plus those a ``Connection`` value names: made
    once per distinct value (upstreams send the same one every time, most
    often ``keep-alive``), not per response; bounded against a hostile one."""
    tokens = frozenset(t.strip().lower() for t in connection.split(b",") if t.strip())
    return HOP_BY_HOP | tokens


def finish_headers(ctx: Context, response: Response, match: Match | None) -> None:
    """What every answer gets last: the hop-by-hop headers (and those its
    ``Connection`` names) removed, the plugins' response headers, the
    RateLimit headers and the version's deprecation headers added."""
    headers = response.headers
    raw = headers.raw
    if raw:
        # ``_drop_set`` inlined: this runs for every answer.
        connection = None
        for name, value in raw:
            if name == b"connection":
                connection = value
                break
        drop = HOP_BY_HOP if connection is None else _drop_for(connection)
        # A plain loop, not any(<generator>): no generator per request.
        for name, _ in raw:
            if name in drop:
                headers.raw = raw = [pair for pair in raw if pair[0] not in drop]
                break
    if ctx.response_headers:
        raw.extend(ctx.response_headers)
    if ctx.rate_limits:
        raw.extend(headers_for(ctx.rate_limits))
    if match is not None and match.deprecation_headers:
        raw.extend(_deprecation_raw(match.deprecation_headers))


def upstream_head(ctx: Context, pool: TargetPool) -> bytes:
    """The request head for ``pool`` (``Upstream.send``'s ``head_for``)."""
    request = ctx.request
    path = pool.base_path + ctx.upstream_path
    consumer = ctx.consumer
    return proxy_request_head(
        request.method,
        f"{path}?{request.query}" if request.query else path,
        pool.authority,
        request.headers,
        client_ip=request.client_ip,
        scheme=request.scheme,
        request_id=ctx.request_id,
        key_id=consumer.id if consumer is not None else None,
        body_length=request.body.length,  # None: chunked; 0: no body
        key_roles=consumer.roles if consumer is not None else (),
    )
