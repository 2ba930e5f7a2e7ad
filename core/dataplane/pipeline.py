"""The request pipeline: one config's whole data plane behind one method.

``Pipeline`` is made once per config from a decided ``PipelinePlan`` (router
compiled, plugins validated, instantiated and bound, chains ordered, upstreams
kept or made: ``triogate.dataplane.plan``) and then serves requests through
``handle(request) -> (ctx, response)``. Both front doors, the native
httptools listener and the ASGI adapter, call exactly this; neither knows
anything about routes or plugins. A config reload plans a new Pipeline
(changing nothing live), makes it and swaps one reference.

Per request:
    route match -> access phases -> upstream wrappers around the proxy call
    -> response phases -> (the front door sends) -> log phases.
A ``GatewayError`` raised anywhere becomes a problem+json response that
still goes through the response phases (so CORS and request-id headers are
on errors too). Anything else is a bug: logged with the request id, answered
500 ``INTERNAL_ERROR``.

Charging (CONTRACT §5): what the access phase took (rate-limit capacity,
credits) is given back (``ctx.undo``) only when the gateway refuses the
request before any byte of it went to the upstream (``ctx.sent_upstream``,
set by the upstream client). Once sent, a request is charged and counted
whatever happens after: a 502, a 504, or a client that leaves mid-body. A
client that leaves still gets its log phases (usage) and its access-log
line, as status 499 with outcome ``client_closed`` (nginx's convention);
``handle`` then re-raises ``ClientDisconnected`` so the front door sends
nothing and hangs up. A request cancelled once the upstream had it (the
shutdown grace period ended) is logged and counted the same way, as status
503 with outcome ``shutdown``, and the cancellation goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import trio

from triogate.config import Config
from triogate.dataplane.messages import (
    REQUEST_ID_RE,
    finish_headers,
    new_request_id,
    problem_response,
    shutdown_response,
    upstream_head,
)
from triogate.dataplane.plan import PipelinePlan, plan_pipeline
from triogate.dataplane.plugin_loader import Chain, RouteSummary
from triogate.errors import (
    BadGateway,
    ClientDisconnected,
    GatewayError,
    InternalError,
    UpstreamError,
)
from triogate.http import Request, Response
from triogate.plugins.contract import Context, Plugin, PluginEnv, RouteView
from triogate.policy.router import Match
from triogate.telemetry.records import (
    CLIENT_CLOSED,
    Observer,
    RequestRecord,
    outcome_of,
    refused_record,
)

__all__ = ["Pipeline", "new_request_id", "problem_response"]

log = logging.getLogger("triogate.dataplane.pipeline")

# A request cancelled once the upstream had it: its log phases get this long.
RECORD_CANCELLED_SECONDS = 1.0


class Pipeline:
    def __init__(self, plan: PipelinePlan) -> None:
        """Act on a decided ``plan`` (``Pipeline.plan``): install its upstreams'
        breakers and serve its config. Cannot fail. ``Pipeline.build`` decides
        and acts at once (start-up, ``check-config``)."""
        config = self.config = plan.config
        self.router = plan.router
        self.chains = plan.chains
        self.global_chain = plan.global_chain
        self.upstreams = plan.upstreams.install()
        # What ctx.route is: one read-only view per route, made once.
        self.route_views = tuple(RouteView.of(r, i) for i, r in enumerate(config.routes))
        self.max_body = config.server.max_request_body_bytes
        # Accept-Version picks among a path's versioned routes only: without
        # one, the header is not looked for (a scan of the headers less).
        self._versioned = any(route.version is not None for route in config.routes)
        self.requests = 0
        self.in_flight = 0  # handle() .. after(): a retired pipeline waits for 0
        self._idle: trio.Event | None = None
        # Told about every request once it is answered (metrics, access log).
        self.observers: list[Observer] = []

    def __repr__(self) -> str:
        return (
            f"<Pipeline {len(self.chains)} routes, {len(self.upstreams)} upstreams, "
            f"{self.requests} requests>"
        )

    @staticmethod
    def plan(
        config: Config,
        registry: Mapping[str, type[Plugin[Any]]],
        env: PluginEnv,
        *,
        previous: Pipeline | None = None,
    ) -> PipelinePlan:
        """Decide ``config``'s data plane, keeping ``previous``'s unchanged
        upstreams; nothing live changes (see ``triogate.dataplane.plan``).
        Raises ConfigError listing every route and plugin problem."""
        live = previous.upstreams if previous is not None else None
        return plan_pipeline(config, registry, env, live=live)

    @classmethod
    def build(
        cls,
        config: Config,
        registry: Mapping[str, type[Plugin[Any]]],
        env: PluginEnv,
        *,
        previous: Pipeline | None = None,
    ) -> Pipeline:
        """Plan and apply at once."""
        return cls(cls.plan(config, registry, env, previous=previous))

    async def wait_idle(self) -> None:
        """Return once no request is in flight on this pipeline."""
        if self.in_flight:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()
        else:
            await trio.lowlevel.checkpoint()

    def describe_routes(self) -> list[RouteSummary]:
        return [
            RouteSummary(
                name=route.name,
                methods=tuple(route.methods) or ("*",),
                path=route.path,
                version=route.version,
                upstream=route.upstream,
                upstream_path=route.upstream_path,
                plugins=self.chains[i].describe(),
            )
            for i, route in enumerate(self.config.routes)
        ]

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()

    # ---- per request -------------------------------------------------------

    async def handle(self, request: Request) -> tuple[Context, Response]:
        """Answer one request. Every call that returns must be followed by
        ``after`` (the front doors do it once the response is sent).

        When the client goes away before it could be answered, the request
        is logged here (log phases and observers, as 499 ``client_closed``)
        and ``ClientDisconnected`` is re-raised: the front door then sends
        nothing and must not call ``after``. Cancelled once the upstream had
        it: logged here as 503 ``shutdown``, and the cancellation re-raised.

        One coroutine for routing, the access phases and the upstream call
        when the route has no upstream wrappers: every coroutine layer costs
        its creation and a pass on each suspension, several per request."""
        self.requests += 1
        self.in_flight += 1
        ctx = self._context(request)
        try:
            chain = self.global_chain
            match: Match | None = None
            try:
                chain, match = self._route(ctx, request)
                response = None
                for access in chain.access:
                    # A synchronous phase form answers directly; an async
                    # phase (or a sync one that must wait) an awaitable.
                    response = access(ctx)
                    if response is not None:
                        if not isinstance(response, Response):
                            response = await response
                            if response is None:
                                continue
                        break
                if response is None:
                    if chain.upstream:
                        response = await self._wrapped(ctx, chain)
                    else:  # no wrappers (the common case): no closures either
                        response = await self._proxy(ctx)
                    if chain.buffering and not response.from_gateway:
                        await self._buffer(ctx, chain, response)
            except ClientDisconnected:
                raise  # nobody to answer: logged below (and maybe given back)
            except UpstreamError as exc:
                # Hosts and ports stay in the log; the client gets the gist.
                log.warning("request %s: %s: %s", ctx.request_id, exc.code, exc.detail)
                exc.detail = exc.public_detail
                response = problem_response(exc, ctx.request_id)
            except GatewayError as exc:
                response = problem_response(exc, ctx.request_id)
            except Exception:
                log.exception("internal error in request %s", ctx.request_id)
                response = problem_response(
                    InternalError("an internal error occurred"), ctx.request_id
                )
            if chain.response:
                response = await self._response_phases(ctx, chain, response)
            if (
                ctx.undo
                and response.from_gateway
                and response.status >= 400
                and not ctx.sent_upstream
            ):
                # Refused by the gateway before the upstream had any of it (a
                # later plugin's refusal, an open breaker, a refused
                # connection). Once sent, a 502 or 504 is charged like any
                # answer.
                self._undo(ctx)
            finish_headers(ctx, response, match)
            return ctx, response
        except ClientDisconnected:
            if not ctx.sent_upstream:
                self._undo(ctx)  # nothing reached the upstream: it costs nothing
            await self.after(ctx, Response(CLIENT_CLOSED, from_gateway=True))
            raise
        except BaseException:
            # Cancelled (the shutdown grace period ended): the same rule. A
            # request the upstream had is charged, so it is also counted and
            # logged (503 ``shutdown``), in a shielded scope with a bound:
            # the cancellation itself is never swallowed.
            if not ctx.sent_upstream:
                self._undo(ctx)
                self._done()
                raise
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + RECORD_CANCELLED_SECONDS
                await self.after(ctx, shutdown_response(ctx.request_id))
            raise

    def _done(self) -> None:
        self.in_flight -= 1
        if self._idle is not None and self.in_flight == 0:
            self._idle.set()

    def _route(self, ctx: Context, request: Request) -> tuple[Chain, Match]:
        """Match the request's route (or raise the router's 404/405/406) and
        put what it found in ``ctx``; the route's chain and the match. Shared
        by ``handle`` and the WebSocket upgrade (``websocket.admit``)."""
        accept_version = request.headers.get_raw(b"accept-version") if self._versioned else None
        match = self.router.match(
            request.method,
            request.path,
            accept_version.decode("latin-1") if accept_version is not None else None,
        )
        index = match.route.index
        ctx.route = self.route_views[index]
        ctx.params = match.params
        ctx.version = match.version
        ctx.upstream_path = self.router.rewrite(match)
        return self.chains[index], match

    @staticmethod
    def _context(request: Request) -> Context:
        sent_id = request.headers.get_raw(b"x-request-id")
        request_id = (
            sent_id.decode("ascii")
            if sent_id is not None and REQUEST_ID_RE.match(sent_id)
            else new_request_id()
        )
        return Context(request, request_id=request_id, started_at=time.monotonic())

    @staticmethod
    async def _response_phases(ctx: Context, chain: Chain, response: Response) -> Response:
        try:
            for phase in chain.response:
                waiting = phase(ctx, response)
                if waiting is not None:
                    await waiting
        except GatewayError as exc:
            response = problem_response(exc, ctx.request_id)
        except Exception:
            log.exception("internal error in a response phase, request %s", ctx.request_id)
            response = problem_response(InternalError("an internal error occurred"), ctx.request_id)
        return response

    @staticmethod
    def _undo(ctx: Context) -> None:
        """Give back what was taken for a request that did not go through."""
        for undo in ctx.undo:
            try:
                undo()
            except Exception:
                log.exception("undo failed for request %s", ctx.request_id)
        ctx.undo.clear()

    async def _wrapped(self, ctx: Context, chain: Chain) -> Response:
        """The upstream call inside the route's upstream wrappers (retry,
        circuit breaker), outermost first."""
        assert ctx.route is not None
        ctx.upstream = self.upstreams[ctx.route.upstream]
        call: Callable[[], Awaitable[Response]] = lambda: self._proxy(ctx)  # noqa: E731
        for wrapper in reversed(chain.upstream):
            call = _wrap(wrapper, ctx, call)
        return await call()

    @staticmethod
    async def _buffer(ctx: Context, chain: Chain, response: Response) -> None:
        """Buffer the body for the plugins that edit it, within their cap."""
        wanting = [p for p in chain.buffering if p.wants_body(ctx, response)]
        if not wanting:
            return
        limit = min(p.max_buffer_bytes for p in wanting)
        try:
            if response.body is not None:
                await response.read(limit)
            elif response.content is not None and len(response.content) > limit:
                raise ValueError("body too large")
        except ValueError:
            raise BadGateway("upstream response too large to transform") from None

    def finish(self, ctx: Context, response: Response) -> Coroutine[Any, Any, None] | None:
        """``after`` without a coroutine when no log phase has to wait (the
        synchronous phase forms, and observers, run here): None when it is
        all done, else a coroutine to await for the rest."""
        # ``_done`` and ``_notify`` inlined: a call each less per request.
        self.in_flight -= 1
        if self._idle is not None and self.in_flight == 0:
            self._idle.set()
        route = ctx.route
        phases = (self.chains[route.index] if route is not None else self.global_chain).log
        for phase in phases:
            try:
                waiting = phase(ctx, response)
            except Exception:
                log.exception("log phase failed for request %s", ctx.request_id)
                continue
            if waiting is not None:
                rest = phases[phases.index(phase) + 1 :]
                return self._log_rest(ctx, response, waiting, rest)
        observers = self.observers
        if observers:
            record = self._record(ctx, response)
            for observe in observers:
                try:
                    observe(record)
                except Exception:
                    log.exception("an observer failed for request %s", record.request_id)
        return None

    async def after(self, ctx: Context, response: Response) -> None:
        """The log phases and the observers, once the response has been
        sent (or its sending failed). Never raises."""
        waiting = self.finish(ctx, response)
        if waiting is not None:
            await waiting

    async def _log_rest(
        self,
        ctx: Context,
        response: Response,
        waiting: Awaitable[None],
        rest: tuple[Callable[..., Any], ...],
    ) -> None:
        try:
            await waiting
        except Exception:
            log.exception("log phase failed for request %s", ctx.request_id)
        for phase in rest:
            try:
                waiting = phase(ctx, response)
                if waiting is not None:
                    await waiting
            except Exception:
                log.exception("log phase failed for request %s", ctx.request_id)
        if self.observers:
            self._notify(self._record(ctx, response))

    def log_refused(
        self,
        method: str,
        target: str,
        client_ip: str,
        response: Response,
        *,
        started_at: float | None = None,
    ) -> None:
        """Tell the observers (access log, metrics) about a request the front
        door refused by itself before routing (400, 408, 413, 431), so that
        probing is visible. Outcome: the problem's ``code``. ``started_at``
        (``time.monotonic()``) gives the line a duration. Never raises."""
        if self.observers:
            record = refused_record(
                method,
                target,
                client_ip,
                response,
                request_id=new_request_id(),
                started_at=started_at,
            )
            self._notify(record)

    def _notify(self, record: RequestRecord) -> None:
        for observe in self.observers:
            try:
                observe(record)
            except Exception:
                log.exception("an observer failed for request %s", record.request_id)

    def _record(self, ctx: Context, response: Response) -> RequestRecord:
        route = ctx.route
        request = ctx.request
        consumer = ctx.consumer
        status = response.status
        # ``outcome_of``'s answer for an upstream's answer, without the call.
        if response.from_gateway:
            outcome = outcome_of(response)
        else:
            outcome = "upstream_error" if status >= 500 else "ok"
        # Positional (the fields' order): msgspec matches no keyword names.
        return RequestRecord(
            time.time(),
            ctx.request_id,
            request.method,
            request.path,
            route.name if route is not None else None,
            route.upstream if route is not None else None,
            status,
            outcome,
            consumer.id if consumer is not None else None,
            ctx.client_ip,
            time.monotonic() - ctx.started_at,
            ctx.upstream_seconds,
            ctx.retries,
        )

    # ---- the innermost call: the upstream ------------------------------------

    def _proxy(self, ctx: Context) -> Coroutine[Any, Any, Response]:
        """The upstream call: a plain function handing back ``Upstream.send``'s
        coroutine, so awaiting it adds no coroutine layer of its own. The
        exchange sets ``ctx.sent_upstream`` (charged from then on, whatever
        happens: CONTRACT §5) and adds to ``ctx.upstream_seconds``."""
        route = ctx.route
        assert route is not None
        body = ctx.request.body
        return self.upstreams[route.upstream].send(
            ctx.request.method,
            upstream_head,
            body if body.length is None or body.length > 0 else None,
            sink=ctx,
            tried=ctx.tried_targets,
        )


def _wrap(
    wrapper: Callable[[Context, Callable[[], Awaitable[Response]]], Awaitable[Response]],
    ctx: Context,
    inner: Callable[[], Awaitable[Response]],
) -> Callable[[], Awaitable[Response]]:
    return lambda: wrapper(ctx, inner)
