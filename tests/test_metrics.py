"""Prometheus metrics: exact values from records (unit), and ``GET /metrics``
on the admin listener of a real gateway counting exactly what was sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FakeClock, make_config, make_secrets
from triogate.admin.openapi import build_openapi
from triogate.runtime.gateway import Gateway
from triogate.storage import MemoryStore
from triogate.telemetry.accesslog import AccessLog
from triogate.telemetry.metrics import DURATION_BUCKETS, Metrics
from triogate.telemetry.records import RequestRecord
from triogate.testing import FakeResponse, FakeUpstream, open_harness

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample, by (name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


def render(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    return samples(body.decode())


def record(**fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "at": 1_800_000_000.0,
        "request_id": "r1",
        "method": "GET",
        "path": "/users/1",
        "route": "users",
        "upstream": "backend",
        "status": 200,
        "outcome": "ok",
        "key_id": "key_a",
        "client_ip": "10.0.0.1",
        "duration_seconds": 0.25,
        "upstream_seconds": 0.125,
        "retries": 0,
    }
    base.update(fields)
    return RequestRecord(**base)


# ---- unit: observe and render ----------------------------------------------


async def test_requests_counted_by_route_status_class_and_outcome(
    memory_gateway: Gateway,
) -> None:
    metrics = memory_gateway.metrics
    metrics.observe(record())
    metrics.observe(record(status=201))
    metrics.observe(record(status=429, outcome="RATE_LIMITED", upstream_seconds=None))
    metrics.observe(record(status=401, outcome="MISSING_KEY", upstream_seconds=None))
    metrics.observe(
        record(
            route=None, upstream=None, status=404, outcome="ROUTE_NOT_FOUND", upstream_seconds=None
        )
    )
    metrics.observe(record(status=503, outcome="upstream_error"))
    got = render(metrics)
    total = "triogate_requests_total"
    assert value(got, total, route="users", status_class="2xx", outcome="ok") == 2
    assert value(got, total, route="users", status_class="4xx", outcome="RATE_LIMITED") == 1
    assert value(got, total, route="users", status_class="4xx", outcome="MISSING_KEY") == 1
    assert value(got, total, route="-", status_class="4xx", outcome="ROUTE_NOT_FOUND") == 1
    assert value(got, total, route="users", status_class="5xx", outcome="upstream_error") == 1
    assert sum(v for (name, _), v in got.items() if name == total) == 6
    # An upstream's own 5xx is not a gateway-answered upstream error.
    assert not [k for k in got if k[0] == "triogate_upstream_errors_total"]


async def test_no_created_series_and_process_metrics(memory_gateway: Gateway) -> None:
    """Counters and histograms without their ``_created`` twins (a gauge
    family each in the text format: noise, and twice the series), and the
    process's own memory, CPU and open files."""
    metrics = memory_gateway.metrics
    metrics.observe(record())
    metrics.observe(record(status=502, outcome="UPSTREAM_UNAVAILABLE", retries=1))
    body, _ = metrics.render()
    text = body.decode()
    assert "_created" not in text
    lines = [line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(lines) == len(set(lines)), "a series is written twice"
    got = render(metrics)
    assert value(got, "process_resident_memory_bytes") > 0
    assert value(got, "process_cpu_seconds_total") > 0
    assert value(got, "process_open_fds") > 0


async def test_histograms_split_gateway_and_upstream_time(memory_gateway: Gateway) -> None:
    metrics = memory_gateway.metrics
    # Binary fractions: sums are exact.
    metrics.observe(record(duration_seconds=0.25, upstream_seconds=0.125))
    metrics.observe(record(duration_seconds=0.5, upstream_seconds=0.5))
    metrics.observe(
        record(status=429, outcome="RATE_LIMITED", duration_seconds=0.0625, upstream_seconds=None)
    )
    got = render(metrics)
    duration = "triogate_request_duration_seconds"
    assert value(got, f"{duration}_count", route="users") == 3
    assert value(got, f"{duration}_sum", route="users") == 0.8125
    assert value(got, f"{duration}_bucket", route="users", le="0.1") == 1
    assert value(got, f"{duration}_bucket", route="users", le="0.25") == 2
    assert value(got, f"{duration}_bucket", route="users", le="0.5") == 3
    assert value(got, f"{duration}_bucket", route="users", le="+Inf") == 3
    buckets = {dict(labels)["le"] for name, labels in got if name == f"{duration}_bucket"}
    assert buckets == {str(b) for b in DURATION_BUCKETS} | {"+Inf"}
    overhead = "triogate_gateway_overhead_seconds"
    assert value(got, f"{overhead}_count", route="users") == 3
    # 0.25 - 0.125, 0.5 - 0.5, and all of a request that never went upstream.
    assert value(got, f"{overhead}_sum", route="users") == 0.125 + 0.0 + 0.0625
    upstream = "triogate_upstream_duration_seconds"
    assert value(got, f"{upstream}_count", upstream="backend") == 2
    assert value(got, f"{upstream}_sum", upstream="backend") == 0.625


async def test_upstream_errors_and_retries(memory_gateway: Gateway) -> None:
    metrics = memory_gateway.metrics
    metrics.observe(record(status=502, outcome="BAD_GATEWAY", retries=2))
    metrics.observe(record(status=502, outcome="BAD_GATEWAY"))
    metrics.observe(record(status=504, outcome="UPSTREAM_TIMEOUT", retries=1))
    metrics.observe(record(status=503, outcome="UPSTREAM_UNAVAILABLE", upstream_seconds=None))
    metrics.observe(record(route="other", upstream="b2", retries=3))
    got = render(metrics)
    errors = "triogate_upstream_errors_total"
    assert value(got, errors, upstream="backend", code="BAD_GATEWAY") == 2
    assert value(got, errors, upstream="backend", code="UPSTREAM_TIMEOUT") == 1
    assert value(got, errors, upstream="backend", code="UPSTREAM_UNAVAILABLE") == 1
    assert sum(v for (name, _), v in got.items() if name == errors) == 4
    assert value(got, "triogate_retries_total", route="users") == 3
    assert value(got, "triogate_retries_total", route="other") == 3


async def test_children_are_cached_per_label_tuple(memory_gateway: Gateway) -> None:
    metrics = memory_gateway.metrics
    for _ in range(3):
        metrics.observe(record())
        metrics.observe(record(status=204))  # same status class, another key
        metrics.observe(record(status=502, outcome="BAD_GATEWAY"))
    # One slot per (route, status, outcome); statuses of one class merge at scrape.
    assert len(metrics._requests) == 3
    assert len(metrics._upstreams) == 1
    assert len(metrics._errors) == 1
    got = render(metrics)
    assert (
        value(got, "triogate_requests_total", route="users", status_class="2xx", outcome="ok") == 6
    )


async def test_scrape_time_gauges(memory_gateway: Gateway, clock: FakeClock) -> None:
    gw = memory_gateway
    got = render(gw.metrics)
    assert value(got, "triogate_actors_live") == 0
    assert value(got, "triogate_actors_dirty") == 0
    assert value(got, "triogate_actor_flushes_total") == 0
    assert value(got, "triogate_actor_flush_lag_seconds") == 0  # nothing waits
    assert value(got, "triogate_storage_size_bytes") == gw.store.statistics().size_bytes
    # No pipeline built (no listener): no upstream series, no in-flight gauge.
    assert not [k for k in got if k[0].startswith(("triogate_breaker", "triogate_upstream"))]

    actor = gw.actors.actor("key_a")
    actor.record_nowait(200, clock())
    clock.advance(3.0)
    got = render(gw.metrics)
    assert value(got, "triogate_actors_live") == 1
    assert value(got, "triogate_actors_dirty") == 1
    assert value(got, "triogate_actor_flush_lag_seconds") == 3.0  # since start: never flushed

    await gw.actors.flush([actor])
    clock.advance(2.0)
    got = render(gw.metrics)
    assert value(got, "triogate_actor_flushes_total") == 1
    assert value(got, "triogate_actors_dirty") == 0
    assert value(got, "triogate_actor_flush_lag_seconds") == 0
    actor.record_nowait(200, clock())
    clock.advance(0.5)
    got = render(gw.metrics)
    assert value(got, "triogate_actor_flush_lag_seconds") == 2.5  # since that flush
    assert value(got, "triogate_storage_size_bytes") == gw.store.statistics().size_bytes > 0


async def test_access_log_drops_are_exported(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path)
    gw = Gateway(config, MemoryStore(), make_secrets(), clock=clock)
    assert gw.access_log is not None  # the default: stdout
    gw.access_log = AccessLog(str(tmp_path / "a.log"), queue_size=2)
    gw.metrics = Metrics(gw, access_log=gw.access_log)
    for _ in range(5):
        gw.access_log.observe(record())
    got = render(gw.metrics)
    assert value(got, "triogate_access_log_dropped_total") == 3
    assert value(got, "triogate_access_log_queued") == 2
    assert value(got, "triogate_access_log_written_total") == 0


async def test_gateways_in_one_process_do_not_collide(tmp_path: Path, clock: FakeClock) -> None:
    a = Gateway(make_config(tmp_path / "a"), MemoryStore(), make_secrets(), clock=clock)
    b = Gateway(make_config(tmp_path / "b"), MemoryStore(), make_secrets(), clock=clock)
    assert a.metrics.registry is not b.metrics.registry
    a.metrics.observe(record())
    total = (
        "triogate_requests_total",
        frozenset({"route": "users", "status_class": "2xx", "outcome": "ok"}.items()),
    )
    assert render(a.metrics)[total] == 1
    assert total not in render(b.metrics)


def test_metrics_endpoint_is_text_in_openapi() -> None:
    op = build_openapi()["paths"]["/metrics"]["get"]
    assert list(op["responses"]["200"]["content"]) == ["text/plain"]
    assert "security" not in op


# ---- integration: the real gateway -------------------------------------------


def _routes() -> list[dict[str, Any]]:
    return [
        {
            "name": "api",
            "path": "/api/{rest:path}",
            "upstream": "test",
            "plugins": {
                "key-auth": {},
                "rate-limit": {"limit": 2, "period_seconds": 3600},
                "circuit-breaker": {},
            },
        },
        {"name": "fragile", "path": "/fragile/{rest:path}", "upstream": "test"},
        {
            "name": "flaky",
            "path": "/flaky/{rest:path}",
            "upstream": "test",
            "plugins": {"retry": {}},
        },
    ]


async def test_metrics_endpoint_counts_what_was_served(tmp_path: Path) -> None:
    # The first upstream exchange is dropped (a reset): 502 BAD_GATEWAY on
    # the route without retries.
    upstream = FakeUpstream([FakeResponse(drop=True)])
    async with open_harness(tmp_path, upstream=upstream, routes=_routes()) as h:
        key = await h.create_key()
        auth = {"Authorization": f"Bearer {key}"}
        assert (await h.client.get("/fragile/x")).status_code == 502
        upstream.script.append(FakeResponse(drop=True))
        flaky = await h.client.get("/flaky/x")  # dropped once, then retried
        assert flaky.status_code == 200
        statuses = [(await h.client.get(f"/api/{i}", headers=auth)).status_code for i in range(3)]
        assert statuses == [200, 200, 429]
        assert (await h.client.get("/api/x")).status_code == 401
        assert (await h.client.get("/nowhere")).status_code == 404

        r = await h.admin.get("/metrics")  # no admin key needed
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == CONTENT_TYPE_LATEST
        got = samples(r.text)

    total = "triogate_requests_total"
    counted = {
        (dict(labels)["route"], dict(labels)["status_class"], dict(labels)["outcome"]): v
        for (name, labels), v in got.items()
        if name == total
    }
    assert counted == {
        ("fragile", "5xx", "BAD_GATEWAY"): 1,
        ("flaky", "2xx", "ok"): 1,
        ("api", "2xx", "ok"): 2,
        ("api", "4xx", "RATE_LIMITED"): 1,
        ("api", "4xx", "MISSING_KEY"): 1,
        ("-", "4xx", "ROUTE_NOT_FOUND"): 1,
    }
    assert value(got, "triogate_upstream_errors_total", upstream="test", code="BAD_GATEWAY") == 1
    assert value(got, "triogate_retries_total", route="flaky") == 1
    assert value(got, "triogate_request_duration_seconds_count", route="api") == 4
    assert value(got, "triogate_gateway_overhead_seconds_count", route="api") == 4
    assert value(got, "triogate_request_duration_seconds_count", route="-") == 1
    # fragile, flaky (both tries in one request) and the two admitted api calls.
    assert value(got, "triogate_upstream_duration_seconds_count", upstream="test") == 4
    target = upstream.url
    assert value(got, "triogate_breaker_state", upstream="test", target=target) == 0  # closed
    assert value(got, "triogate_upstream_target_healthy", upstream="test", target=target) == 1
    assert value(got, "triogate_actors_live") >= 1
    assert value(got, "triogate_in_flight_requests") == 0
    assert value(got, "triogate_storage_size_bytes") > 0
    assert value(got, "triogate_access_log_dropped_total") == 0


async def test_metrics_endpoint_shows_an_open_breaker(tmp_path: Path) -> None:
    upstream = FakeUpstream(handler=lambda request: _status(500))
    routes = [
        {
            "name": "api",
            "path": "/{rest:path}",
            "upstream": "test",
            "plugins": {"circuit-breaker": {"failure_threshold": 2, "open_seconds": 60}},
        }
    ]
    async with open_harness(tmp_path, upstream=upstream, routes=routes) as h:
        for _ in range(2):
            assert (await h.client.get("/x")).status_code == 500
        refused = await h.client.get("/x")
        assert refused.status_code == 503
        got = samples((await h.admin.get("/metrics")).text)
    labels = {"upstream": "test", "target": upstream.url}
    assert value(got, "triogate_breaker_state", **labels) == 2  # open
    assert value(got, "triogate_breaker_opened_total", **labels) == 1
    total = "triogate_requests_total"
    assert value(got, total, route="api", status_class="5xx", outcome="upstream_error") == 2
    assert value(got, total, route="api", status_class="5xx", outcome="UPSTREAM_UNAVAILABLE") == 1
    errors = "triogate_upstream_errors_total"
    assert value(got, errors, upstream="test", code="UPSTREAM_UNAVAILABLE") == 1


async def _status(status: int) -> FakeResponse:
    return FakeResponse(status)
