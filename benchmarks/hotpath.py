"""Where a proxied request's Python work goes, stage by stage, without sockets.

``python -m benchmarks hotpath [--seconds S]``

The proxy benchmark measures whole requests; py-spy's samples of them are
dominated by the system calls (and by the upstream on the same core running
while the gateway is preempted), so the Python stages are hard to weigh
there. This runs each stage of the native data plane's request path alone,
in a loop, on a real gateway (real LMDB, real keys, the proxy benchmark's
routes), and prints µs per request per stage:

  parse         llhttp callbacks for a request head as wrk sends it, the
                target check, the head's framing, the Request object
  route         the Context (request id) and the router's match and rewrite
  upstream head the request head as it goes upstream (forwarding headers)
  answer parse  llhttp callbacks for nginx's 200 answer, the Response
  key-auth      the key's checks and its own limits and credits (access)
  rate-limit    the route's limit by key (access)
  headers       the answer's last headers (hop-by-hop out, RateLimit in) and
                the response head bytes
  log           the log phases (usage) and the observers (the request
                record, metrics)

Their sum, next to the proxy benchmark's CPU per request for the same
route, shows how much is these stages and how much is the I/O, trio's
scheduling and the coroutine layers between them. Each figure is the best
of three runs (the least disturbed by anything else on the machine).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from triogate.config import parse_config
from triogate.control.audit import Actor
from triogate.control.models import CreateKeyRequest
from triogate.dataplane.messages import finish_headers, upstream_head
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_loader import Chain
from triogate.http import Body, Headers, Request, Response, check_target
from triogate.http.h1client import ResponseParser
from triogate.http.h1parse import RequestParser
from triogate.http.h1write import response_head
from triogate.plugins.contract import Context
from triogate.runtime.gateway import Gateway, open_gateway
from triogate.storage import RateLimit
from triogate.storage.records import Credits

from .machine import describe, pin

NGINX_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 13:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 20\r\n"
    b"Connection: keep-alive\r\n\r\ntriogate-bench-body\n"
)
NEVER = 1_000_000_000


def _config(data_dir: Path) -> dict[str, object]:
    return {
        "server": {"data_dir": str(data_dir)},
        "log": {"access_log": ""},
        "upstreams": {"nginx": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [
            {"name": "nokey", "path": "/nokey/{rest:path}", "upstream": "nginx"},
            {
                "name": "limited",
                "path": "/limited/{rest:path}",
                "upstream": "nginx",
                "plugins": {
                    "key-auth": {},
                    "rate-limit": {"limit": NEVER, "period_seconds": 1, "by": "key"},
                },
            },
        ],
    }


def _best(fn: Callable[[], object], seconds: float) -> float:
    """µs per call: the best of three runs of ``seconds`` each."""
    best = float("inf")
    for _ in range(3):
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(200):
                fn()
            n += 200
            now = time.perf_counter()
            if now >= deadline:
                break
        best = min(best, (now - start) / n * 1e6)
    return best


def _request_bytes(path: str, key: str | None) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    if key is not None:
        head += f"X-API-Key: {key}\r\n"
    return (head + "\r\n").encode()


_REQUESTS = RequestParser(65536, 1 << 20)  # one per connection, reused


def _parse(wire: bytes) -> Request:
    parsed = _REQUESTS
    parsed.parser.feed_data(wire)
    pending = parsed.ready.popleft()
    path, query = check_target(pending.url)
    length = pending.read_framing()
    return Request(
        method=pending.method,
        path=path,
        query=query,
        headers=Headers(pending.headers),
        body=Body(_NoBody(), length or 0),
        client_ip="127.0.0.1",
        http_version=pending.version,
    )


class _NoBody:
    def __aiter__(self) -> _NoBody:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


def _context(pipeline: Pipeline, request: Request) -> Context:
    ctx = pipeline._context(request)
    match = pipeline.router.match(request.method, request.path, None)
    index = match.route.index
    ctx.route = pipeline.route_views[index]
    ctx.params = match.params
    ctx.upstream_path = pipeline.router.rewrite(match)
    return ctx


_ANSWERS = ResponseParser(False)  # one per upstream connection, reused


def _answer() -> Response:
    parsed = _ANSWERS
    parsed.reset(False)
    parsed.parser.feed_data(NGINX_ANSWER)
    return Response(parsed.status, Headers(parsed.headers), content=b"".join(parsed.body))


_PARSED = _answer()


def _parsed_answer() -> Response:
    """nginx's answer as the upstream client hands it over (parsing is the
    "answer parse" stage)."""
    return Response(_PARSED.status, Headers(list(_PARSED.headers.raw)), content=_PARSED.content)


async def _measure(args: argparse.Namespace, gw: Gateway) -> list[tuple[str, float, float]]:
    created = await gw.keys.create(
        CreateKeyRequest(
            name="bench",
            owner="bench",
            rate_limits=[RateLimit(name="burst", limit=NEVER, period_seconds=1)],
            credits=Credits(remaining=10**15),
        ),
        Actor("bench"),
    )
    key = created.key
    pipeline = gw.pipeline
    pool = pipeline.upstreams["nginx"].pools[0]
    seconds = args.seconds
    rows: list[tuple[str, float, float]] = []
    for route, secret in (("nokey", None), ("limited", key)):
        wire = _request_bytes(f"/{route}/bench/item", secret)
        request = _parse(wire)
        chain = pipeline.chains[[r.name for r in pipeline.config.routes].index(route)]

        def access(request: Request = request, chain: Chain = chain) -> Context:
            # A fresh request each time: key-auth edits the headers.
            fresh = Request(
                method=request.method,
                path=request.path,
                query=request.query,
                headers=Headers(list(request.headers.raw)),
                body=request.body,
                client_ip=request.client_ip,
            )
            ctx = _context(pipeline, fresh)
            for phase in chain.access:
                phase(ctx)
            return ctx

        sample = access()
        n_access = len(chain.access)

        def headers(sample: Context = sample) -> None:
            response = _parsed_answer()
            finish_headers(sample, response, None)
            b"".join(response_head(response, "GET", "1.1", True)[0])

        def logged(sample: Context = sample) -> None:
            pipeline.in_flight += 1
            waiting = pipeline.finish(sample, Response(200))
            assert waiting is None

        stages: list[tuple[str, Callable[[], object]]] = [
            ("parse", functools.partial(_parse, wire)),
            ("route", functools.partial(_context, pipeline, request)),
            ("upstream head", functools.partial(upstream_head, sample, pool)),
            ("answer parse", _answer),
        ]
        if n_access:
            # access() includes a Context and a copy of the headers: less
            # what "route" costs, the phases themselves.
            stages.append(("access phases (+route)", access))
        stages += [("headers", headers), ("log", logged)]
        for name, fn in stages:
            rows.append((f"{route}: {name}", _best(fn, seconds), 0.0))
            await trio.lowlevel.checkpoint()  # the actors' flusher may run
    return rows


async def _run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory(prefix="triogate-hotpath-") as tmp:
        config = parse_config(_config(Path(tmp)), environ={})
        async with open_gateway(config) as gw:
            return await _measure(args, gw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks hotpath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=0.5, help="per run; best of three")
    parser.add_argument("--core", type=int, default=0, help="pin to this core (-1: none)")
    args = parser.parse_args(argv)
    print(describe(pin(args.core if args.core >= 0 else None)))
    rows = trio.run(_run, args)
    totals: dict[str, float] = {}
    for name, us, _ in rows:
        route = name.split(":", 1)[0]
        totals[route] = totals.get(route, 0.0) + us
        print(f"{name:38} {us:7.2f} µs")
    for route, total in totals.items():
        print(f"{route + ': sum of the stages':38} {total:7.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
