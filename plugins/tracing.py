"""``tracing``: OpenTelemetry spans for every request and every upstream try.

On the routes that have it (put it in the global ``[plugins]`` table for
all of them), a request gets one SERVER span, from its arrival to the end
of its response, named ``METHOD /route/template``, with the route, the key
id (never the key), the status and the gateway's outcome (its problem code);
each try of the upstream call gets a CLIENT span below it (the ``retry``
plugin's tries are so many spans, ``http.request.resend_count`` numbering
the retries), and the upstream receives a W3C ``traceparent`` whose parent
is that try's span.

A caller's ``traceparent``/``tracestate`` is continued when valid (parent
based sampling: its sampled flag wins) and ignored when not (a new trace
starts; a bad header is never refused). ``sample_ratio`` decides for the
traces started here; an unsampled trace records and exports nothing but
its ``traceparent`` still goes upstream, so the upstream's own spans can
join the caller's trace.

Spans are exported over OTLP/HTTP by the gateway's ``env.tracers`` (one
provider per export setting, a batch thread, flushed when the gateway
stops). The OpenTelemetry SDK is an optional extra (``pip install
'triogate[otel]'``): it is imported when a route with this plugin is built,
never otherwise, and a missing SDK is a load error naming the plugin.

Off costs nothing: a route without the plugin has no phase of it in its
chain. The upstream wrapper sets ``wraps_each_try`` so that it runs around
each single try, inside ``retry`` whatever the priorities.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from triogate.errors import GatewayError
from triogate.plugins.contract import CallNext, Context, Plugin, PluginEnv, Response

__all__ = ["Tracing", "TracingConfig"]

HeaderName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")]
HeaderValue = Annotated[str, Meta(max_length=8192, pattern=r"^[^\r\n\x00]*$")]

#: Where ``ctx.state`` keeps the request's SERVER span.
SPAN = "tracing.span"

#: Semantic conventions: the methods named as they are; others are _OTHER.
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"}
)
CLIENT_CLOSED = 499

#: The API's loggers that warn about a caller's bad ``traceparent`` /
#: ``tracestate``, quoting it: once per request, so any client could write
#: a line per request into the gateway's log. The W3C rules say to ignore a
#: bad header; so does the log.
CLIENT_HEADER_LOGGERS = ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext")


class _IgnoreClientHeaders(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_IGNORE_CLIENT_HEADERS = _IgnoreClientHeaders()


class TracingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sample_ratio: Annotated[
        float,
        Meta(
            ge=0,
            le=1,
            description=(
                "share of the traces started here that are recorded and exported "
                "(parent-based: a caller's sampled flag wins)"
            ),
        ),
    ] = 1.0
    endpoint: Annotated[
        str,
        Meta(
            pattern=r"^https?://[^\s]+$",
            max_length=2048,
            description="the OTLP/HTTP traces URL, path included (protobuf is sent)",
        ),
    ] = "http://127.0.0.1:4318/v1/traces"
    headers: Annotated[
        dict[HeaderName, HeaderValue],
        Meta(description="headers sent with every export (a collector's token, say)"),
    ] = msgspec.field(default_factory=dict)
    service_name: Annotated[
        str, Meta(min_length=1, max_length=256, description="the service.name of the spans")
    ] = "triogate"
    timeout_seconds: Annotated[
        float, Meta(gt=0, le=300, description="time one export may take, its retries included")
    ] = 5.0
    max_queue_size: Annotated[
        int,
        Meta(ge=1, le=1_000_000, description="spans waiting for export, at most; more are dropped"),
    ] = 2048
    max_export_batch_size: Annotated[
        int, Meta(ge=1, le=100_000, description="spans per export request, at most")
    ] = 512
    schedule_delay_seconds: Annotated[
        float, Meta(gt=0, le=3600, description="longest wait before queued spans are sent")
    ] = 1.0

    def __post_init__(self) -> None:
        if self.max_export_batch_size > self.max_queue_size:
            raise ValueError("max_export_batch_size must not exceed max_queue_size")


class _HeadersGetter:
    """The W3C propagator's view of a request's headers."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values: list[str] = carrier.get_all(key)
        return values or None

    def keys(self, carrier: Any) -> list[str]:
        return [name for name, _ in carrier]


def _method(method: str) -> dict[str, str]:
    if method in KNOWN_METHODS:
        return {"http.request.method": method}
    return {"http.request.method": "_OTHER", "http.request.method_original": method}


def _outcome(response: Response) -> str:
    """The access log's outcome: the problem code of the gateway's answers."""
    if response.from_gateway:
        if response.status == CLIENT_CLOSED:
            return "client_closed"
        problem = response.problem
        return problem.code if problem is not None else "error"
    return "upstream_error" if response.status >= 500 else "ok"


class Tracing(Plugin[TracingConfig]):
    name = "tracing"
    priority = 90000
    Config = TracingConfig
    #: The upstream wrapper is per try: innermost, inside ``retry``.
    wraps_each_try = True

    def __init__(self, config: TracingConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ValueError(
                "tracing needs the OpenTelemetry SDK and OTLP exporter: "
                "pip install 'triogate[otel]'"
            ) from None
        for name in CLIENT_HEADER_LOGGERS:  # idempotent: one filter object
            logging.getLogger(name).addFilter(_IGNORE_CLIENT_HEADERS)
        self._trace = trace
        self._kind_server = trace.SpanKind.SERVER
        self._kind_client = trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR
        self._status = trace.Status
        self._propagator = TraceContextTextMapPropagator()
        self._getter: Any = _HeadersGetter()  # duck-typed: a Getter[Headers]
        tracer = self.make_tracer(config, env)
        self.tracer: Any = tracer if tracer is not None else trace.NoOpTracer()

    def make_tracer(self, config: TracingConfig, env: PluginEnv) -> Any:
        """The tracer the spans come from: the gateway's, for these export
        settings (a subclass may hand another, as the tests do)."""
        return env.tracers.tracer(config)

    # ---- the SERVER span -------------------------------------------------------

    def _start(self, ctx: Context) -> Any:
        request = ctx.request
        parent = self._propagator.extract(request.headers, getter=self._getter)
        route = ctx.route
        attributes: dict[str, Any] = {
            **_method(request.method),
            "url.path": request.path,
            "url.scheme": request.scheme,
            "client.address": ctx.client_ip,
            "triogate.request_id": ctx.request_id,
        }
        if route is not None:
            attributes["http.route"] = route.path
            attributes["triogate.route"] = route.name
            attributes["triogate.upstream"] = route.upstream
            name = f"{request.method} {route.path}"
        else:
            name = request.method
        # The request arrived at ctx.started_at (monotonic): the span too.
        started = time.time_ns() - int((time.monotonic() - ctx.started_at) * 1e9)
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=self._kind_server,
            attributes=attributes,
            start_time=started,
        )
        ctx.state[SPAN] = span
        return span

    def access_nowait(self, ctx: Context) -> None:
        self._start(ctx)

    def log_nowait(self, ctx: Context, response: Response) -> None:
        state = ctx.state
        span = state.pop(SPAN, None)
        if span is None:  # no route matched (the global chain's log phase)
            span = self._start(ctx)
            state.pop(SPAN, None)
        if not span.is_recording():
            span.end()
            return
        status = response.status
        outcome = _outcome(response)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("triogate.outcome", outcome)
        if ctx.consumer is not None:
            span.set_attribute("triogate.key_id", ctx.consumer.id)
        if ctx.retries:
            span.set_attribute("triogate.retries", ctx.retries)
        if status >= 500:
            problem = response.problem
            span.set_attribute("error.type", problem.code if problem is not None else str(status))
            span.set_status(self._status(self._error, outcome))
        span.end()

    # ---- a CLIENT span per upstream try -------------------------------------------

    async def upstream(self, ctx: Context, call_next: CallNext) -> Response:
        trace = self._trace
        server = ctx.state.get(SPAN)
        parent = trace.set_span_in_context(server) if server is not None else None
        attributes: dict[str, Any] = {**_method(ctx.request.method), "url.path": ctx.upstream_path}
        if ctx.upstream is not None:
            attributes["triogate.upstream"] = ctx.upstream.name
        if ctx.retries:
            attributes["http.request.resend_count"] = ctx.retries
        span = self.tracer.start_span(
            ctx.request.method, context=parent, kind=self._kind_client, attributes=attributes
        )
        _propagate(ctx, self._propagator, trace.set_span_in_context(span))
        try:
            response = await call_next()
        except GatewayError as exc:
            span.set_attribute("error.type", exc.code)
            span.set_status(self._status(self._error, exc.code))
            span.end()
            raise
        except BaseException as exc:  # cancelled (a try's timeout, shutdown)
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(self._status(self._error, type(exc).__name__))
            span.end()
            raise
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 400:
            span.set_attribute("error.type", str(response.status))
            span.set_status(self._status(self._error))
        span.end()
        return response


def _propagate(ctx: Context, propagator: Any, context: Any) -> None:
    """Replace the caller's trace headers with the try span's."""
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=context)
    headers = ctx.request.headers
    headers.remove("traceparent")
    headers.remove("tracestate")
    for name, value in carrier.items():
        headers.set(name, value)
