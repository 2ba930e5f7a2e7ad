"""Tracing against a real OTLP/HTTP receiver: the real ``triogate serve``
exports its spans as protobuf over HTTP to a receiver this test runs on
127.0.0.1 (decoded with opentelemetry-proto); the last spans are flushed
when the gateway stops; with the receiver down, requests are unaffected and
the failure is logged once."""

from __future__ import annotations

import http.server
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers_process import free_ports, serving

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import Span
except ImportError as exc:  # pragma: no cover - a setup problem, not a skip
    raise ImportError(
        f"the OTLP tests need opentelemetry-proto: pip install -e '.[test]' ({exc})"
    ) from exc

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
WAIT_SECONDS = 20.0


@dataclass
class Received:
    """One exported span, decoded."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    service_name: str


@dataclass
class Receiver:
    url: str = ""
    spans: list[Received] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.spans)

    def wait_for(self, count: int, timeout: float = WAIT_SECONDS) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.snapshot()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{len(self.snapshot())} spans arrived, expected {count}")


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind is not None else None


def _decode(body: bytes) -> list[Received]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append(
                    Received(
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        service_name=str(resource.get("service.name")),
                    )
                )
    return out


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    """A small OTLP/HTTP receiver: POST /v1/traces, protobuf in and out."""
    receiver = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            spans = _decode(body)
            with receiver.lock:
                receiver.spans.extend(spans)
                receiver.content_types.append(self.headers.get("content-type", ""))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def recording_upstream() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An upstream answering 200 "ok" that records every request's headers."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def write_traced_config(
    tmp_path: Path, upstream: str, endpoint: str, **tracing: float | str
) -> Path:
    settings = {"endpoint": endpoint, "service_name": "edge-test", **tracing}
    body = "\n".join(
        f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in settings.items()
    )
    path = tmp_path / "triogate.toml"
    path.write_text(
        f"""
[server]
admin_listen = "127.0.0.1:0"
proxy_listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
shutdown_grace_seconds = 5

[plugins.tracing]
{body}

[upstreams.test]
targets = ["{upstream}"]

[[routes]]
name = "test"
path = "/{{rest:path}}"
upstream = "test"
"""
    )
    return path


def test_spans_arrive_at_a_real_otlp_receiver(tmp_path: Path) -> None:
    with (
        otlp_receiver() as receiver,
        recording_upstream() as (upstream, seen),
    ):
        cfg = write_traced_config(tmp_path, upstream, receiver.url, schedule_delay_seconds=0.05)
        with serving(cfg) as sp, httpx.Client(base_url=sp.proxy_url, timeout=10) as client:
            caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            for _ in range(3):
                assert client.get("/orders", headers=caller).status_code == 200
            got = receiver.wait_for(6)
            assert sp.stop() == 0, sp.stderr()
    assert all(ct == "application/x-protobuf" for ct in receiver.content_types)
    servers = [s for s in got if s.kind == Span.SPAN_KIND_SERVER]
    clients = [s for s in got if s.kind == Span.SPAN_KIND_CLIENT]
    assert len(servers) == 3 and len(clients) == 3
    for s in got:
        assert s.trace_id == CALLER_TRACE
        assert s.service_name == "edge-test"
    for s in servers:
        assert s.parent_span_id == CALLER_SPAN
        assert s.name == "GET /{rest:path}"
        assert s.attributes["triogate.route"] == "test"
        assert s.attributes["http.response.status_code"] == 200
        assert s.attributes["triogate.outcome"] == "ok"
    server_ids = {s.span_id for s in servers}
    assert {c.parent_span_id for c in clients} == server_ids
    # The upstream heard of each try's span.
    told = {h["traceparent"].split("-")[2] for h in seen}
    assert told == {c.span_id for c in clients}


def test_the_last_spans_are_flushed_when_the_gateway_stops(tmp_path: Path) -> None:
    with otlp_receiver() as receiver, recording_upstream() as (upstream, _):
        # A batch is sent after a minute: only the stop can send these.
        cfg = write_traced_config(tmp_path, upstream, receiver.url, schedule_delay_seconds=60)
        with serving(cfg) as sp, httpx.Client(base_url=sp.proxy_url, timeout=10) as client:
            for _ in range(2):
                assert client.get("/x").status_code == 200
            time.sleep(0.3)
            assert receiver.snapshot() == []
            assert sp.stop(signal.SIGTERM) == 0, sp.stderr()
        got = receiver.snapshot()
    assert len(got) == 4, got


def test_a_receiver_that_is_down_costs_requests_nothing(tmp_path: Path) -> None:
    (dead,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{dead}/v1/traces"
    with recording_upstream() as (upstream, seen):
        cfg = write_traced_config(
            tmp_path, upstream, endpoint, schedule_delay_seconds=0.05, timeout_seconds=0.5
        )
        with serving(cfg) as sp, httpx.Client(base_url=sp.proxy_url, timeout=10) as client:
            for _ in range(20):
                assert client.get("/x").status_code == 200
            deadline = time.monotonic() + WAIT_SECONDS
            while "span export to" not in sp.stderr() and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(20):  # more batches fail, silently
                assert client.get("/x").status_code == 200
            time.sleep(1.0)
            assert sp.stop() == 0, sp.stderr()
            stderr = sp.stderr()
    assert len(seen) == 40
    assert all("traceparent" in h for h in seen)  # still propagated
    failures = [line for line in stderr.splitlines() if "span export to" in line]
    assert len(failures) == 1, stderr
    assert endpoint in failures[0]
    assert "Traceback" not in stderr
    assert "opentelemetry" not in stderr  # the exporter's own lines are kept out
