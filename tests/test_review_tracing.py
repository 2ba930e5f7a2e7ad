"""Review of the ``tracing`` plugin (docs/tracing.md) as a hostile client
would use it: through the real listener and a real upstream on 127.0.0.1,
with the SDK's in-memory exporter (tests/test_tracing.py's harness)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.test_tracing import CALLER_SPAN, CALLER_TRACE, only, sent_traceparent, traced

try:
    from opentelemetry.trace import SpanKind
except ImportError as exc:  # pragma: no cover - a setup problem, not a skip
    raise ImportError(
        f"the tracing tests need the otel extra: pip install -e '.[test]' ({exc})"
    ) from exc

VALID = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"

# Each is a client-controlled trace header the W3C rules say to ignore.
NOISY = [
    {"traceparent": VALID, "tracestate": "not a member!!"},
    {"traceparent": VALID, "tracestate": ",".join(f"k{i}=v" for i in range(40))},
    {"traceparent": VALID, "tracestate": "k=" + "v" * 600},
    {"traceparent": VALID, "tracestate": "a=1,a=2"},
    {"traceparent": "0" * 600},
]


@pytest.mark.parametrize("headers", NOISY, ids=range(len(NOISY)))
async def test_a_bad_trace_header_writes_no_log_line_per_request(
    tmp_path: Path, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A bad header is ignored quietly: the SDK's per-header warnings
    (quoting the client's text) must not reach the gateway's log, or any
    client can write a warning line per request into it."""
    caplog.set_level(logging.DEBUG)
    async with traced(tmp_path) as (h, exporter):
        for _ in range(3):
            r = await h.client.get("/x", headers=headers)
            assert r.status_code == 200, r.text
        sent_traceparent(h)
        forwarded = [v for n, v in h.upstream.requests[0].headers if n.lower() == "tracestate"]
    noisy = [
        (r.name, r.getMessage()[:80])
        for r in caplog.records
        if r.name.startswith("opentelemetry") and r.levelno >= logging.INFO
    ]
    assert noisy == []
    assert forwarded == []  # the bad tracestate is dropped, not forwarded
    assert len([s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]) == 3


async def test_a_good_tracestate_still_goes_upstream(tmp_path: Path) -> None:
    """The quieting drops log lines only: a valid tracestate is kept."""
    async with traced(tmp_path) as (h, exporter):
        r = await h.client.get("/x", headers={"traceparent": VALID, "tracestate": "v=1,w=2"})
        assert r.status_code == 200
        forwarded = [v for n, v in h.upstream.requests[0].headers if n.lower() == "tracestate"]
    assert forwarded == ["v=1,w=2"]
    assert only(exporter, SpanKind.SERVER).parent is not None


async def test_a_smuggled_trace_header_never_reaches_the_upstream_as_sent(
    tmp_path: Path,
) -> None:
    """Several traceparent/tracestate fields, mixed case: the upstream gets
    exactly one of each, the gateway's."""
    async with traced(tmp_path) as (h, _exporter):
        r = await h.client.get(
            "/x",
            headers=[
                ("TraceParent", VALID),
                ("traceparent", f"00-{'1' * 32}-{'2' * 16}-01"),
                ("TRACESTATE", "evil=1"),
            ],
        )
        assert r.status_code == 200
        sent = sent_traceparent(h)  # asserts exactly one
        states = [v for n, v in h.upstream.requests[0].headers if n.lower() == "tracestate"]
    assert sent.group(1) == CALLER_TRACE and sent.group(2) != CALLER_SPAN
    assert states == ["evil=1"]


async def test_a_client_that_hangs_up_mid_call_leaves_no_span_open(tmp_path: Path) -> None:
    """The client goes away while the upstream is still thinking: both spans
    end, the try's as an error (the listener notices the hang-up when it
    answers: client_closed, or the try's timeout first)."""
    import trio

    from triogate.testing import FakeResponse, FakeUpstream

    upstream = FakeUpstream([FakeResponse(200, delay=60)])
    async with traced(tmp_path, upstream=upstream) as (h, exporter):
        url = h.client.base_url
        stream = await trio.open_tcp_stream(str(url.host), int(url.port or 80))
        head = f"GET /slow HTTP/1.1\r\nhost: x\r\ntraceparent: {VALID}\r\n\r\n"
        await stream.send_all(head.encode())
        for _ in range(500):  # bounded: the upstream has it
            if h.upstream.requests:
                break
            await trio.sleep(0.01)
        assert h.upstream.requests
        await stream.aclose()
        for _ in range(1500):
            if len(exporter.get_finished_spans()) >= 2:
                break
            await trio.sleep(0.01)
    server = only(exporter, SpanKind.SERVER)
    client = only(exporter, SpanKind.CLIENT)
    outcome = dict(server.attributes or {})["triogate.outcome"]
    assert outcome in {"client_closed", "UPSTREAM_TIMEOUT"}, outcome
    assert client.end_time is not None and "error.type" in dict(client.attributes or {})
