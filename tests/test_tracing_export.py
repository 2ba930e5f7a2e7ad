"""The gateway's span exporters (``triogate.telemetry.tracing``), without a
gateway: one provider per export setting, the sampler, a flush on close,
and an exporter failure logged once per outage, never raised."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import trio

from triogate.plugins.tracing import TracingConfig
from triogate.telemetry.tracing import OnceLoggingExporter, Tracers

try:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError as exc:  # pragma: no cover - a setup problem, not a skip
    raise ImportError(
        f"the tracing tests need the otel extra: pip install -e '.[test]' ({exc})"
    ) from exc


class Flaky(SpanExporter):
    """Fails (or raises) while ``down``; counts what it got."""

    def __init__(self) -> None:
        self.down = True
        self.raises = False
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.down:
            if self.raises:
                raise ConnectionError("boom")
            logging.getLogger("opentelemetry.exporter.otlp.common.http").error(
                "Failed to export spans batch code: 503, reason: down"
            )
            return SpanExportResult.FAILURE
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def test_a_failing_exporter_is_logged_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    from triogate.telemetry.tracing import _install_quiet

    _install_quiet()
    flaky = Flaky()
    exporter = OnceLoggingExporter(flaky, "http://collector/v1/traces")
    caplog.set_level(logging.INFO)
    for _ in range(5):
        assert exporter.export([]) is SpanExportResult.FAILURE
    flaky.raises = True
    assert exporter.export([]) is SpanExportResult.FAILURE  # raised: a failure, not raised
    warnings = [r for r in caplog.records if r.name == "triogate.telemetry.tracing"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "http://collector/v1/traces" in warnings[0].getMessage()
    assert "503" in warnings[0].getMessage()  # the exporter's reason, quoted
    # The exporter's own per-batch lines are kept out of the log.
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry.exporter")]
    assert exporter.failures == 6
    flaky.down = False
    assert exporter.export([]) is SpanExportResult.SUCCESS
    assert exporter.export([]) is SpanExportResult.SUCCESS
    messages = [r.getMessage() for r in caplog.records if r.name == "triogate.telemetry.tracing"]
    assert len(messages) == 2 and "works again" in messages[1]
    flaky.down = True
    flaky.raises = False
    exporter.export([])
    messages = [r.getMessage() for r in caplog.records if r.name == "triogate.telemetry.tracing"]
    assert len(messages) == 3  # a new outage: told once more


def test_one_provider_per_export_setting() -> None:
    tracers = Tracers(lambda settings: InMemorySpanExporter(), batch=False)
    a = TracingConfig()
    tracers.tracer(a)
    tracers.tracer(TracingConfig())  # equal settings: the same provider
    assert len(tracers.providers) == 1
    tracers.tracer(TracingConfig(sample_ratio=0.5))
    tracers.tracer(TracingConfig(headers={"x-token": "t"}))
    assert len(tracers.providers) == 3
    tracers.shutdown()
    assert tracers.providers == {}


def test_the_ratio_samples_traces_started_here() -> None:
    memory = InMemorySpanExporter()
    tracers = Tracers(lambda settings: memory, batch=False)
    half = tracers.tracer(TracingConfig(sample_ratio=0.5))
    for _ in range(400):
        half.start_span("x").end()
    recorded = len(memory.get_finished_spans())
    assert 100 < recorded < 300, recorded  # 200 expected; the bound is ~10 sigma
    none = tracers.tracer(TracingConfig(sample_ratio=0.0))
    memory.clear()
    for _ in range(50):
        none.start_span("x").end()
    assert memory.get_finished_spans() == ()
    tracers.shutdown()


async def test_close_flushes_what_is_queued() -> None:
    memory = InMemorySpanExporter()
    tracers = Tracers(lambda settings: memory)  # the batch processor, a thread
    tracer = tracers.tracer(TracingConfig(schedule_delay_seconds=3600))
    for _ in range(3):
        tracer.start_span("queued").end()
    await trio.sleep(0.05)
    assert memory.get_finished_spans() == ()  # a batch waits an hour
    await tracers.aclose()
    assert [s.name for s in memory.get_finished_spans()] == ["queued"] * 3
    assert tracers.providers == {}
    await tracers.aclose()  # again: nothing to do


async def test_close_is_bounded_when_the_export_hangs() -> None:
    import threading

    release = trio.Event()
    token = trio.lowlevel.current_trio_token()
    unblock = threading.Event()
    finished = threading.Event()

    class Hanging(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            trio.from_thread.run_sync(release.set, trio_token=token)
            unblock.wait(30)  # a receiver that does not answer until told
            finished.set()
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            return None

    tracers = Tracers(lambda settings: Hanging())
    tracers.tracer(TracingConfig(schedule_delay_seconds=0.01)).start_span("x").end()
    try:
        with trio.fail_after(10):
            await release.wait()
            await tracers.aclose(within=0.2)
        assert not finished.is_set()  # it gave up on the export, did not wait it out
    finally:
        unblock.set()
