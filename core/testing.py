"""Test helpers for triogate and for plugin authors (pytest-trio).

A plugin is tested against the real gateway (real listener, real LMDB in a
temp dir) and a scripted fake upstream, in a few lines::

    from triogate.testing import FakeUpstream, open_harness

    async def test_my_plugin(tmp_path):
        upstream = FakeUpstream()
        async with open_harness(tmp_path, plugins={"my-plugin": {"greeting": "hi"}},
                                upstream=upstream, extra_plugins=[MyPlugin]) as h:
            r = await h.client.get("/anything")
            assert r.headers["x-greeting"] == "hi"
            assert upstream.requests[0].path == "/anything"

``extra_plugins`` registers classes that are not installed as entry points
yet (a plugin under development); an installed plugin is found by name.
``httpx`` is needed (``pip install triogate[test]``).

A single phase can also be called directly, without a server, on a
``Context`` from ``make_context`` (and a ``RouteView`` from ``route_view``)::

    plugin = MyPlugin(MyPlugin.Config(), PluginEnv())
    ctx = make_context("GET", "/orders", headers=[("x-tenant", "a")])
    assert await plugin.access(ctx) is None

The fake upstream is written with h11, the strict sans-IO HTTP/1.1 library:
for a test peer, strictness matters more than speed.
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import msgspec
import trio

from triogate.config import Config, parse_config
from triogate.dataplane.plugin_loader import ENTRY_POINT_GROUP, build_chain, discover
from triogate.errors import PluginLoadError
from triogate.http import Headers, Request, body_from_bytes
from triogate.plugins.contract import Context, Plugin, RouteView
from triogate.storage import KeyRecord

if TYPE_CHECKING:
    import httpx

    from triogate.runtime.server import Server, ServerInfo

__all__ = [
    "ENTRY_POINT_GROUP",
    "FakeResponse",
    "FakeUpstream",
    "Harness",
    "LoopbackServer",
    "PluginLoadError",
    "RecordedRequest",
    "build_chain",
    "discover",
    "harness_config",
    "key_record",
    "make_context",
    "open_harness",
    "route_view",
]


def key_record(key_id: str = "key_x", **fields: Any) -> KeyRecord:
    """A stored key record with placeholder crypto fields, for tests (and
    benchmarks) of what only reads records: actors, decisions, stores."""
    record = KeyRecord(
        id=key_id,
        digest=b"d",
        digest_version=1,
        start="tg_abcd",
        name="n",
        sealed=b"",
        owner_tag=b"",
        owner_tag_version=1,
        scopes=(),
        status="active",
        created_at=0.0,
        updated_at=0.0,
    )
    return msgspec.structs.replace(record, **fields) if fields else record


def route_view(
    name: str = "test",
    *,
    path: str = "/{rest:path}",
    upstream: str = "test",
    methods: Sequence[str] = (),
    index: int = 0,
    upstream_path: str | None = None,
    version: str | None = None,
) -> RouteView:
    """A route as ``ctx.route`` and ``bind`` see it (defaults: the harness's
    one route)."""
    return RouteView(
        name=name,
        index=index,
        path=path,
        upstream=upstream,
        upstream_path=upstream_path,
        methods=frozenset(methods) or None,
        version=version,
    )


def make_context(
    method: str = "GET",
    path: str = "/",
    *,
    query: str = "",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    client_ip: str = "127.0.0.1",
    route: RouteView | None = None,
    request_id: str = "test-request",
) -> Context:
    """One request's ``Context``, as the pipeline makes it after routing
    (``route`` defaults to ``route_view()``), to call a plugin's phases
    directly in a unit test."""
    request = Request(
        method=method,
        path=path,
        query=query,
        headers=Headers.of(headers),
        body=body_from_bytes(body),
        client_ip=client_ip,
    )
    return Context(
        request,
        request_id=request_id,
        started_at=0.0,
        route=route if route is not None else route_view(),
    )


@dataclass
class RecordedRequest:
    """What the fake upstream received."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass
class FakeResponse:
    """One scripted answer. ``delay`` waits before answering; ``drop`` closes
    the connection without answering (a reset, as far as the gateway sees);
    ``chunks`` streams the body in pieces (chunked, no Content-Length)."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunks: list[bytes] | None = None
    delay: float = 0.0
    drop: bool = False

    @classmethod
    def json(cls, doc: Any, status: int = 200, **kw: Any) -> FakeResponse:
        return cls(status, [("content-type", "application/json")], json.dumps(doc).encode(), **kw)


Handler = Callable[[RecordedRequest], Awaitable[FakeResponse]]


async def echo(request: RecordedRequest) -> FakeResponse:
    """The default behaviour: answer 200 with a JSON description of the request."""
    return FakeResponse.json(
        {
            "method": request.method,
            "target": request.target,
            "headers": dict(request.headers),
            "body_bytes": len(request.body),
        }
    )


class LoopbackServer:
    """A test server on a free port of 127.0.0.1: ``await nursery.start(s.run)``
    hands back the port; each connection goes to ``_connection``."""

    port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError


class FakeUpstream(LoopbackServer):
    """A scripted HTTP/1.1 upstream on 127.0.0.1, recording every request.

    ``script`` answers are used first, one per request, in order; after that
    ``handler`` (default: ``echo``) answers."""

    def __init__(
        self,
        script: Sequence[FakeResponse] = (),
        handler: Handler = echo,
        *,
        record_bodies: bool = True,
        single_write: bool = False,
    ) -> None:
        self.script: collections.deque[FakeResponse] = collections.deque(script)
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self.body_sizes: list[int] = []  # every request's, recorded or not
        self.connections = 0
        self.record_bodies = record_bodies
        # Write a whole (unchunked) answer in one send, as most servers do
        # with small ones: the gateway then reads it in the same read as its head.
        self.single_write = single_write

    def __repr__(self) -> str:
        return (
            f"<FakeUpstream :{self.port} {len(self.requests)} requests, "
            f"{len(self.script)} scripted left>"
        )

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                self.requests.append(request)
                answer = self.script.popleft() if self.script else await self.handler(request)
                if answer.delay:
                    await trio.sleep(answer.delay)
                if answer.drop:
                    return
                await self._respond(conn, stream, request, answer)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                self.body_chunk(event.data)
                if self.record_bodies:
                    body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self.body_sizes.append(size)
                self.body_done()
                return RecordedRequest(
                    method=head.method.decode(),
                    target=head.target.decode(),
                    headers=[(k.decode(), v.decode("latin-1")) for k, v in head.headers],
                    body=bytes(body),
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None
            else:  # pragma: no cover - h11 has no other events for a server
                return None

    def body_chunk(self, data: bytes) -> None:
        """Called with every piece of a request body (subclasses may hash it)."""

    def body_done(self) -> None:
        """Called when a request body is complete."""

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: RecordedRequest,
        answer: FakeResponse,
    ) -> None:
        if self.single_write and answer.chunks is None:
            headers = [*answer.headers, ("content-length", str(len(answer.body)))]
            out = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
            if answer.body and request.method != "HEAD":
                out += conn.send(h11.Data(data=answer.body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
            return
        headers = list(answer.headers)
        names = {k.lower() for k, _ in headers}
        if answer.chunks is None and "content-length" not in names:
            headers.append(("content-length", str(len(answer.body))))
        if answer.chunks is not None and "transfer-encoding" not in names:
            headers.append(("transfer-encoding", "chunked"))
        await stream.send_all(conn.send(h11.Response(status_code=answer.status, headers=headers)))
        if request.method != "HEAD":
            for piece in answer.chunks if answer.chunks is not None else [answer.body]:
                if piece:
                    await stream.send_all(conn.send(h11.Data(data=piece)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


def harness_config(
    data_dir: Path,
    upstream_url: str,
    *,
    plugins: dict[str, dict[str, Any]] | None = None,
    global_plugins: dict[str, dict[str, Any]] | None = None,
    path: str = "/{rest:path}",
    upstream_path: str | None = None,
    routes: list[dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    upstream_settings: dict[str, Any] | None = None,
    api_versions: dict[str, Any] | None = None,
) -> Config:
    """A config with one upstream (``test``) and one route (``test``) unless
    ``routes`` are given. ``upstream_settings`` go into ``[upstreams.test]``
    (e.g. more ``targets``, ``read_timeout_seconds``)."""
    raw: dict[str, Any] = {
        "server": {
            "proxy_listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
            "shutdown_grace_seconds": 2,
            **(server or {}),
        },
        "plugins": global_plugins or {},
        "upstreams": {
            "test": {
                "targets": [upstream_url],
                "read_timeout_seconds": 5,
                **(upstream_settings or {}),
            }
        },
        "api_versions": api_versions or {},
        "routes": routes
        or [
            {
                "name": "test",
                "path": path,
                "upstream": "test",
                "plugins": plugins or {},
                **({"upstream_path": upstream_path} if upstream_path else {}),
            }
        ],
    }
    return parse_config(raw, environ={})


@dataclass
class Harness:
    server: Server
    info: ServerInfo
    upstream: FakeUpstream
    client: httpx.AsyncClient  # to the proxy listener
    admin: httpx.AsyncClient  # to the admin API

    async def create_key(self, scopes: Sequence[str] = (), **fields: Any) -> str:
        """A new API key (created directly through the key service)."""
        from triogate.control.audit import Actor
        from triogate.control.models import CreateKeyRequest

        assert self.server.gateway is not None
        req = CreateKeyRequest(name="test", owner="test", scopes=list(scopes), **fields)
        created = await self.server.gateway.keys.create(req, Actor("testing"))
        return created.key


@asynccontextmanager
async def open_harness(
    data_dir: Path,
    *,
    upstream: FakeUpstream | None = None,
    plugins: dict[str, dict[str, Any]] | None = None,
    global_plugins: dict[str, dict[str, Any]] | None = None,
    extra_plugins: Sequence[type[Plugin[Any]]] = (),
    config: Config | None = None,
    clock: Callable[[], float] | None = None,
    **config_kw: Any,
) -> AsyncIterator[Harness]:
    """Run a fake upstream and a real gateway in front of it. ``clock`` (a
    callable giving epoch seconds) replaces the services' wall clock: key
    expiry, rotation grace, credits refills and rate-limit windows then move
    only when the test moves it."""
    import httpx

    from triogate.runtime.server import Server

    upstream = upstream or FakeUpstream()
    async with trio.open_nursery() as nursery:
        if not upstream.port:  # a test may have started it already
            await nursery.start(upstream.run)
        if config is None:
            config = harness_config(
                data_dir,
                upstream.url,
                plugins=plugins,
                global_plugins=global_plugins,
                **config_kw,
            )
        server = (
            Server(config, extra_plugins=extra_plugins)
            if clock is None
            else Server(config, extra_plugins=extra_plugins, clock=clock)
        )
        info = await nursery.start(server.run)
        async with (
            httpx.AsyncClient(base_url=info.proxy_url, timeout=10) as client,
            httpx.AsyncClient(base_url=info.admin_url, timeout=10) as admin,
        ):
            yield Harness(server, info, upstream, client, admin)
        server.shutdown()
        with trio.move_on_after(10):
            await server.stopped.wait()
        # The fake upstream serves forever: stop it.
        nursery.cancel_scope.cancel()
