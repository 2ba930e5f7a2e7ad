"""OpenTelemetry tracer providers for the ``tracing`` plugin, owned by the gateway.

The ``tracing`` plugin (``triogate.plugins.tracing``) makes the spans; this
module makes what exports them: one SDK ``TracerProvider`` per distinct
export setting (endpoint, headers, service name, sampling ratio, batching),
shared by every route and every config load that asks for the same, and
flushed and shut down when the gateway stops (``Tracers.aclose``). The
gateway lends a ``Tracers`` to the plugins as ``env.tracers``.

Why the SDK's ``BatchSpanProcessor`` (a thread) and not a trio task: the
OTLP/HTTP exporter is synchronous (``requests``), so a trio task would have
to hand every export to a worker thread anyway; the batch processor already
is that thread, with a bounded queue. What the request path does is
``span.end()``: an append to that queue (a full queue drops the span, never
waits), so a slow or dead receiver can never slow a request down.

The SDK is an optional extra (``pip install triogate[otel]``): it is
imported only when a provider is first made, so a gateway without the
``tracing`` plugin never loads it.

An exporter that fails logs once per outage (``OnceLoggingExporter``), not
once per batch and never per request: the OTLP exporter's own per-batch
messages are kept out of the log and the first one is quoted instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Tracer

__all__ = [
    "OTEL_MISSING",
    "ExportSettings",
    "OnceLoggingExporter",
    "Tracers",
    "otlp_exporter",
]

log = logging.getLogger("triogate.telemetry.tracing")

#: The logger of the OTLP/HTTP span exporter and of its HTTP client.
OTLP_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
)

OTEL_MISSING = "tracing needs the OpenTelemetry SDK and OTLP exporter: pip install 'triogate[otel]'"

#: How long ``aclose`` waits for the last spans to go out.
CLOSE_SECONDS = 10.0


class ExportSettings(Protocol):
    """What a provider is made from (the ``tracing`` plugin's settings fit)."""

    @property
    def endpoint(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def service_name(self) -> str: ...
    @property
    def sample_ratio(self) -> float: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def max_queue_size(self) -> int: ...
    @property
    def max_export_batch_size(self) -> int: ...
    @property
    def schedule_delay_seconds(self) -> float: ...


def _key(settings: ExportSettings) -> tuple[Any, ...]:
    return (
        settings.endpoint,
        tuple(sorted(settings.headers.items())),
        settings.service_name,
        settings.sample_ratio,
        settings.timeout_seconds,
        settings.max_queue_size,
        settings.max_export_batch_size,
        settings.schedule_delay_seconds,
    )


def otlp_exporter(settings: ExportSettings) -> SpanExporter:
    """The OTLP/HTTP (protobuf) span exporter for ``settings``."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=settings.endpoint,
        headers=dict(settings.headers),
        timeout=settings.timeout_seconds,
    )


class _Quiet(logging.Filter):
    """Keeps the OTLP exporter's per-batch failure messages out of the log,
    remembering the first one of an export (usually the one naming the
    cause) for ``OnceLoggingExporter`` to quote."""

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            if self.first is None:
                self.first = record.getMessage()[:300]
            return False
        return True


_QUIET = _Quiet()
_quiet_lock = threading.Lock()
_quiet_installed = False


def _install_quiet() -> None:
    global _quiet_installed
    with _quiet_lock:
        if not _quiet_installed:
            for name in OTLP_LOGGERS:
                logging.getLogger(name).addFilter(_QUIET)
            _quiet_installed = True


class OnceLoggingExporter:
    """A ``SpanExporter`` around another: the first failure of an outage is
    logged (a warning naming the endpoint), the rest are not, and the first
    success after it is logged as the end of the outage. Exceptions from the
    inner exporter are a failure too, never raised into the SDK's thread."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self.failing = False
        self.failures = 0  # batches not exported, for tests and the curious

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from opentelemetry.sdk.trace.export import SpanExportResult

        _QUIET.first = None
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # a broken exporter must not kill the thread
            _QUIET.first = repr(exc)[:300]
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            if self.failing:
                self.failing = False
                log.info("tracing: span export to %s works again", self.endpoint)
            return result
        self.failures += 1
        if not self.failing:
            self.failing = True
            log.warning(
                "tracing: span export to %s failed (%s); spans are dropped, requests are "
                "not affected; further failures are not logged until an export succeeds",
                self.endpoint,
                _QUIET.first or "no detail",
            )
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Tracers:
    """The gateway's tracer providers, by export setting (``env.tracers``).

    ``exporter`` makes a provider's exporter (default: OTLP/HTTP);
    ``batch=False`` exports each span as it ends, on the ending thread (for
    tests with the SDK's in-memory exporter only: never on the request path
    of a real gateway)."""

    def __init__(
        self,
        exporter: Callable[[ExportSettings], SpanExporter] = otlp_exporter,
        *,
        batch: bool = True,
    ) -> None:
        self.exporter = exporter
        self.batch = batch
        self.providers: dict[tuple[Any, ...], TracerProvider] = {}

    def __repr__(self) -> str:
        return f"<Tracers {len(self.providers)} providers>"

    def tracer(self, settings: ExportSettings) -> Tracer:
        """A tracer whose spans go out as ``settings`` say. ``ValueError``
        (a load error naming the plugin) when the SDK is not installed."""
        key = _key(settings)
        provider = self.providers.get(key)
        if provider is None:
            provider = self.providers[key] = self._provider(settings)
        return provider.get_tracer("triogate")

    def _provider(self, settings: ExportSettings) -> TracerProvider:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as exc:
            raise ValueError(f"{OTEL_MISSING} ({exc})") from None
        _install_quiet()
        provider = TracerProvider(
            # Parent-based: a caller's sampled flag is obeyed (a trace is
            # whole or absent); the ratio decides for traces started here.
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create({"service.name": settings.service_name}),
            shutdown_on_exit=False,  # aclose does it, bounded
        )
        # Duck-typed: the class cannot subclass an SDK class this module
        # must not import unless tracing is on.
        exporter = cast(
            "SpanExporter", OnceLoggingExporter(self.exporter(settings), settings.endpoint)
        )
        if self.batch:
            provider.add_span_processor(
                BatchSpanProcessor(
                    exporter,
                    max_queue_size=settings.max_queue_size,
                    max_export_batch_size=settings.max_export_batch_size,
                    schedule_delay_millis=settings.schedule_delay_seconds * 1000,
                    export_timeout_millis=settings.timeout_seconds * 1000,
                )
            )
        else:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider

    def shutdown(self) -> None:
        """Flush and stop every provider; blocks (see ``aclose``)."""
        providers = list(self.providers.values())
        self.providers.clear()
        for provider in providers:
            try:
                provider.shutdown()
            except Exception:
                log.exception("tracing: shutting a tracer provider down failed")

    async def aclose(self, within: float = CLOSE_SECONDS) -> None:
        """Flush the spans still queued and stop the export threads, in a
        worker thread, shielded and bounded by ``within`` seconds: on gateway stop."""
        if not self.providers:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + within) as scope:
            await trio.to_thread.run_sync(self.shutdown, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning("tracing: the last spans were not all exported within %.0fs", within)
