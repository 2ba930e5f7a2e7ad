"""OpenTelemetry tracing (docs/tracing.md) through the real listener and a
real upstream on 127.0.0.1, with the SDK's in-memory exporter in place of
OTLP (tests/test_tracing_otlp.py has the real receiver): a SERVER span per
request, a CLIENT span per upstream try, W3C trace context continued,
started and propagated, sampling, and nothing at all when it is off."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers_gateway import assert_problem, bearer, refused_config
from triogate.plugins.contract import PluginEnv
from triogate.plugins.tracing import Tracing, TracingConfig
from triogate.telemetry.tracing import Tracers
from triogate.testing import FakeResponse, FakeUpstream, Harness, open_harness

try:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode
except ImportError as exc:  # pragma: no cover - a setup problem, not a skip
    raise ImportError(
        f"the tracing tests need the otel extra: pip install -e '.[test]' ({exc})"
    ) from exc

TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def memory_plugin(exporter: InMemorySpanExporter) -> tuple[type[Tracing], Tracers]:
    """The real ``tracing`` plugin whose tracers export to ``exporter``, at
    once (the only difference from the installed one)."""
    tracers = Tracers(lambda settings: exporter, batch=False)

    class MemoryTracing(Tracing):
        def make_tracer(self, config: TracingConfig, env: PluginEnv) -> Any:
            return tracers.tracer(config)

    return MemoryTracing, tracers


@asynccontextmanager
async def traced(
    tmp_path: Path,
    *,
    upstream: FakeUpstream | None = None,
    tracing: dict[str, Any] | None = None,
    plugins: dict[str, dict[str, Any]] | None = None,
) -> AsyncIterator[tuple[Harness, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    plugin, tracers = memory_plugin(exporter)
    async with open_harness(
        tmp_path,
        upstream=upstream,
        extra_plugins=[plugin],
        global_plugins={"tracing": tracing or {}},
        plugins=plugins,
    ) as h:
        yield h, exporter
    tracers.shutdown()


def spans(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


def only(exporter: InMemorySpanExporter, kind: SpanKind) -> ReadableSpan:
    found = spans(exporter, kind)
    assert len(found) == 1, [(s.name, s.kind) for s in exporter.get_finished_spans()]
    return found[0]


def sent_traceparent(h: Harness, index: int = -1) -> re.Match[str]:
    values = [v for n, v in h.upstream.requests[index].headers if n.lower() == "traceparent"]
    assert len(values) == 1, h.upstream.requests[index].headers
    m = TRACEPARENT_RE.match(values[0])
    assert m is not None, values[0]
    return m


def sampled(m: re.Match[str]) -> bool:
    """The sampled flag (the SDK also sets level 2's random-trace-id flag, 02)."""
    return bool(int(m.group(3), 16) & 1)


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


# ---- a span per request ----------------------------------------------------------


async def test_a_request_gets_a_server_span_and_a_client_span(tmp_path: Path) -> None:
    async with traced(tmp_path, plugins={"key-auth": {}}) as (h, exporter):
        key = await h.create_key()
        r = await h.client.get("/orders/7?token=secret", headers=bearer(key))
        assert r.status_code == 200, r.text
        request_id = next(
            v for n, v in h.upstream.requests[0].headers if n.lower() == "x-request-id"
        )
        key_id = next(v for n, v in h.upstream.requests[0].headers if n.lower() == "x-key-id")
    server = only(exporter, SpanKind.SERVER)
    client = only(exporter, SpanKind.CLIENT)
    attrs = dict(server.attributes or {})
    assert server.name == "GET /{rest:path}"
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.route"] == "/{rest:path}"
    assert attrs["triogate.route"] == "test"
    assert attrs["url.path"] == "/orders/7"
    assert attrs["http.response.status_code"] == 200
    assert attrs["triogate.outcome"] == "ok"
    assert attrs["triogate.key_id"] == key_id
    assert attrs["triogate.request_id"] == request_id
    assert attrs["client.address"] == "127.0.0.1"
    assert server.status.status_code is StatusCode.UNSET
    # Neither the key nor the query (which may carry secrets) is recorded.
    everything = repr([dict(s.attributes or {}) for s in exporter.get_finished_spans()])
    assert key not in everything and "secret" not in everything
    # The try is the request's child, and the upstream's parent.
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert hex_trace(client) == hex_trace(server)
    assert dict(client.attributes or {})["http.response.status_code"] == 200
    assert dict(client.attributes or {})["triogate.upstream"] == "test"
    sent = sent_traceparent(h)
    assert sent.group(1) == hex_trace(server)
    assert sent.group(2) == hex_span(client)
    assert sampled(sent)
    # A new trace: the server span has no parent.
    assert server.parent is None


async def test_a_refused_request_has_its_span_with_the_problem_code(tmp_path: Path) -> None:
    async with traced(tmp_path, plugins={"key-auth": {}}) as (h, exporter):
        r = await h.client.get("/x")
        assert_problem(r, 401, "MISSING_KEY")
        assert h.upstream.requests == []
    server = only(exporter, SpanKind.SERVER)
    attrs = dict(server.attributes or {})
    assert attrs["http.response.status_code"] == 401
    assert attrs["triogate.outcome"] == "MISSING_KEY"
    assert "triogate.key_id" not in attrs
    assert server.status.status_code is StatusCode.UNSET  # a 4xx is the client's
    assert spans(exporter, SpanKind.CLIENT) == []


async def test_an_upstream_failure_marks_both_spans(tmp_path: Path) -> None:
    upstream = FakeUpstream([FakeResponse(drop=True)])
    async with traced(tmp_path, upstream=upstream) as (h, exporter):
        r = await h.client.get("/x")
        assert_problem(r, 502, "BAD_GATEWAY")
    server = only(exporter, SpanKind.SERVER)
    client = only(exporter, SpanKind.CLIENT)
    assert server.status.status_code is StatusCode.ERROR
    assert dict(server.attributes or {})["error.type"] == "BAD_GATEWAY"
    assert dict(server.attributes or {})["triogate.outcome"] == "BAD_GATEWAY"
    assert client.status.status_code is StatusCode.ERROR
    assert dict(client.attributes or {})["error.type"] == "BAD_GATEWAY"


async def test_a_request_no_route_matched_is_traced_too(tmp_path: Path) -> None:
    routes = [{"name": "only", "path": "/only", "upstream": "test"}]
    exporter = InMemorySpanExporter()
    plugin, tracers = memory_plugin(exporter)
    upstream = FakeUpstream()
    async with open_harness(
        tmp_path,
        upstream=upstream,
        extra_plugins=[plugin],
        global_plugins={"tracing": {}},
        routes=routes,
    ) as h:
        r = await h.client.get("/elsewhere")
        assert r.status_code == 404
    tracers.shutdown()
    server = only(exporter, SpanKind.SERVER)
    attrs = dict(server.attributes or {})
    assert server.name == "GET"
    assert "http.route" not in attrs
    assert attrs["http.response.status_code"] == 404
    assert attrs["triogate.outcome"] == r.json()["code"]


# ---- trace context: continued, propagated, or started -----------------------------


async def test_a_caller_traceparent_is_continued_and_passed_on(tmp_path: Path) -> None:
    async with traced(tmp_path) as (h, exporter):
        r = await h.client.get(
            "/x",
            headers={
                "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
                "tracestate": "vendor=opaque",
            },
        )
        assert r.status_code == 200
    server = only(exporter, SpanKind.SERVER)
    client = only(exporter, SpanKind.CLIENT)
    assert hex_trace(server) == CALLER_TRACE
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert server.parent.is_remote
    sent = sent_traceparent(h)
    assert sent.group(1) == CALLER_TRACE
    assert sent.group(2) == hex_span(client) != CALLER_SPAN
    headers = dict((n.lower(), v) for n, v in h.upstream.requests[0].headers)
    assert headers["tracestate"] == "vendor=opaque"


BAD_TRACEPARENTS = [
    "garbage",
    f"00-{'0' * 32}-{CALLER_SPAN}-01",  # all-zero trace id
    f"00-{CALLER_TRACE}-{'0' * 16}-01",  # all-zero parent id
    f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",  # the forbidden version
    f"00-{CALLER_TRACE[:-1]}-{CALLER_SPAN}-01",  # short
    f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",  # upper case
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",  # version 00 has four fields
    "00-" + "z" * 32 + f"-{CALLER_SPAN}-01",
    "x" * 4000,
]


@pytest.mark.parametrize("bad", BAD_TRACEPARENTS, ids=range(len(BAD_TRACEPARENTS)))
async def test_a_bad_traceparent_is_ignored_and_a_trace_started(tmp_path: Path, bad: str) -> None:
    async with traced(tmp_path) as (h, exporter):
        r = await h.client.get("/x", headers={"traceparent": bad, "tracestate": "a=b"})
        assert r.status_code == 200, r.text
        sent = sent_traceparent(h)
        forwarded = [n for n, _ in h.upstream.requests[0].headers if n.lower() == "tracestate"]
    server = only(exporter, SpanKind.SERVER)
    assert server.parent is None
    assert hex_trace(server) != CALLER_TRACE
    assert sent.group(1) == hex_trace(server)
    assert forwarded == []  # a tracestate without its traceparent means nothing


# ---- retries: one span per try ----------------------------------------------------------


async def test_each_retry_is_a_span_of_its_own(tmp_path: Path) -> None:
    upstream = FakeUpstream([FakeResponse(503), FakeResponse(200, body=b"fine")])
    retry = {"retry": {"attempts": 3, "backoff_base_seconds": 0, "backoff_cap_seconds": 0}}
    async with traced(tmp_path, upstream=upstream, plugins=retry) as (h, exporter):
        r = await h.client.get("/x")
        assert r.status_code == 200 and r.text == "fine"
        assert len(h.upstream.requests) == 2
        first, second = sent_traceparent(h, 0), sent_traceparent(h, 1)
    server = only(exporter, SpanKind.SERVER)
    tries = sorted(spans(exporter, SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert len(tries) == 2
    for span in tries:
        assert span.parent is not None and span.parent.span_id == server.context.span_id
    assert dict(tries[0].attributes or {})["http.response.status_code"] == 503
    assert tries[0].status.status_code is StatusCode.ERROR
    assert "http.request.resend_count" not in dict(tries[0].attributes or {})
    assert dict(tries[1].attributes or {})["http.request.resend_count"] == 1
    assert dict(tries[1].attributes or {})["http.response.status_code"] == 200
    # Each try told the upstream its own span.
    assert first.group(2) == hex_span(tries[0])
    assert second.group(2) == hex_span(tries[1])
    assert dict(server.attributes or {})["triogate.retries"] == 1


# ---- sampling --------------------------------------------------------------------------


async def test_ratio_zero_exports_nothing_but_still_propagates(tmp_path: Path) -> None:
    async with traced(tmp_path, tracing={"sample_ratio": 0}) as (h, exporter):
        for _ in range(5):
            r = await h.client.get("/x")
            assert r.status_code == 200
        sent = [sent_traceparent(h, i) for i in range(5)]
    assert exporter.get_finished_spans() == ()
    assert not any(sampled(m) for m in sent)  # not sampled, said so
    assert all(int(m.group(1), 16) != 0 and int(m.group(2), 16) != 0 for m in sent)
    assert len({m.group(1) for m in sent}) == 5  # a trace each


async def test_ratio_zero_obeys_a_sampled_caller(tmp_path: Path) -> None:
    async with traced(tmp_path, tracing={"sample_ratio": 0}) as (h, exporter):
        sampled = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        unsampled = {"traceparent": f"00-{'1' * 32}-{CALLER_SPAN}-00"}
        assert (await h.client.get("/x", headers=sampled)).status_code == 200
        assert (await h.client.get("/x", headers=unsampled)).status_code == 200
        assert sent_traceparent(h, 1).group(1) == "1" * 32
    assert {hex_trace(s) for s in exporter.get_finished_spans()} == {CALLER_TRACE}
    assert len(exporter.get_finished_spans()) == 2


async def test_ratio_one_with_an_unsampled_caller_records_nothing(tmp_path: Path) -> None:
    async with traced(tmp_path) as (h, exporter):
        r = await h.client.get("/x", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
        assert r.status_code == 200
        sent = sent_traceparent(h)
    assert exporter.get_finished_spans() == ()
    assert sent.group(1) == CALLER_TRACE and not sampled(sent)


# ---- off: nothing on the route ------------------------------------------------------------


async def test_off_the_route_has_no_trace_of_it(tmp_path: Path) -> None:
    async with open_harness(tmp_path) as h:
        r = await h.client.get("/x", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        assert r.status_code == 200
        gateway = h.server.gateway
        assert gateway is not None
        chain = gateway.pipeline.chains[0]
        assert chain.upstream == () and chain.access == () and chain.log == ()
        assert gateway.tracers.providers == {}  # no exporter, no thread
    # The caller's header goes through untouched, as any other header.
    assert sent_traceparent(h).group(2) == CALLER_SPAN


async def test_the_try_wrapper_runs_inside_retry(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    plugin, tracers = memory_plugin(exporter)
    async with open_harness(
        tmp_path, extra_plugins=[plugin], plugins={"retry": {}, "tracing": {}}
    ) as h:
        assert h.server.gateway is not None
        chain = h.server.gateway.pipeline.chains[0]
        order = [p.name for p in chain.plugins]
        assert order.index("tracing") < order.index("retry")  # priority: tracing first
        owners = [getattr(w, "__self__", None) for w in chain.upstream]
        assert [type(o).name for o in owners] == ["retry", "tracing"]  # but innermost
    tracers.shutdown()


# ---- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"sample_ratio": 1.5}, "sample_ratio"),
        ({"sample_ratio": -0.1}, "sample_ratio"),
        ({"endpoint": "ftp://collector/v1/traces"}, "endpoint"),
        ({"max_queue_size": 10, "max_export_batch_size": 20}, "max_export_batch_size"),
        ({"headers": {"bad name": "x"}}, "headers"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_bad_settings_are_load_errors(
    tmp_path: Path, settings: dict[str, Any], field: str
) -> None:
    error = await refused_config(tmp_path, global_plugins={"tracing": settings})
    assert "tracing" in str(error) and field in str(error), str(error)


def test_without_the_sdk_the_plugin_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ValueError, match=r"triogate\[otel\]"):
        Tracing(TracingConfig(), PluginEnv())


def test_without_the_gateway_nothing_is_exported() -> None:
    # check-config and unit tests: PluginEnv() lends a stand-in, no thread.
    plugin = Tracing(TracingConfig(), PluginEnv())
    span = plugin.tracer.start_span("x")
    assert not span.is_recording()


async def test_the_gateway_lends_its_tracers_and_closes_them(tmp_path: Path) -> None:
    # The installed plugin, not the in-memory one: the gateway's env.tracers
    # makes one provider for the two routes' equal settings and closes it on stop.
    dead = "http://127.0.0.1:9/v1/traces"  # discard port: nothing listens
    routes = [
        {"name": "a", "path": "/a", "upstream": "test"},
        {"name": "b", "path": "/b", "upstream": "test"},
    ]
    settings = {"endpoint": dead, "timeout_seconds": 0.2}
    async with open_harness(tmp_path, global_plugins={"tracing": settings}, routes=routes) as h:
        gateway = h.server.gateway
        assert gateway is not None
        assert len(gateway.tracers.providers) == 1
        for path in ("/a", "/b"):
            r = await h.client.get(path)
            assert r.status_code == 200
        assert all(sent_traceparent(h, i) for i in range(2))
    assert gateway.tracers.providers == {}  # flushed and shut down with the gateway
