"""Prometheus metrics for ``GET /metrics`` on the admin listener.

Two kinds, kept apart by when they cost something:

- **Per request** (``observe``, a telemetry observer): plain counts and
  bucket counts in dicts, updated from each ``RequestRecord``. This is on
  the request path, so it does no more than a few dict lookups and a
  bisection; the Prometheus counters and histograms are built from those
  numbers at scrape time (``_RequestCollector``).
- **At scrape time** (``_GatewayCollector``): gauges read from the services'
  ``statistics()``: actors, flushes, storage, upstream targets and their
  breakers, the access log. Nothing is maintained for them between scrapes.

Each ``Metrics`` owns its ``CollectorRegistry`` (never the global one), so
several gateways in one process (tests) do not collide. With
``server.workers > 1`` only worker 0 serves the admin API, so ``/metrics``
shows that worker's requests and the shared storage.

No ``_created`` series: in the text format prometheus_client writes them as
separate gauge families beside every counter and histogram, which doubles
the series for no use (the same choice as ``PROMETHEUS_DISABLE_CREATED_SERIES``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from triogate import __version__
from triogate.policy.breaker import BreakerSnapshot
from triogate.storage import StoreStatistics
from triogate.telemetry.accesslog import AccessLog
from triogate.telemetry.records import RequestRecord

__all__ = [
    "BREAKER_STATES",
    "DURATION_BUCKETS",
    "OVERHEAD_BUCKETS",
    "ActorCounts",
    "Metrics",
    "ScrapeSources",
    "TargetCounts",
    "UpstreamCounts",
]

# Whole requests and upstream waits: from half a millisecond to 10 s.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# The gateway's own share is usually tens of microseconds: finer at the bottom.
OVERHEAD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1.0,
)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
# Outcomes that are the upstream's failure, as the gateway answered them.
UPSTREAM_ERRORS = frozenset(
    {"BAD_GATEWAY", "UPSTREAM_TLS_ERROR", "UPSTREAM_TIMEOUT", "UPSTREAM_UNAVAILABLE"}
)
NO_ROUTE = "-"


# ---- what a scrape reads ----------------------------------------------------------
# Telemetry sits below the data plane, so the data plane's records are named
# here by the fields read (``ActorStatistics``, ``UpstreamStatistics`` and
# ``TargetStatistics`` of triogate.dataplane have them), and the runtime hands
# its gateway over as the ``ScrapeSources``.


class ActorCounts(Protocol):
    @property
    def live_actors(self) -> int: ...
    @property
    def dirty(self) -> int: ...
    @property
    def flushes(self) -> int: ...
    @property
    def evicted(self) -> int: ...
    @property
    def last_flush_at(self) -> float | None: ...


class TargetCounts(Protocol):
    @property
    def target(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def active(self) -> int: ...
    @property
    def breaker(self) -> BreakerSnapshot | None: ...


class UpstreamCounts(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def targets(self) -> Sequence[TargetCounts]: ...


class ScrapeSources(Protocol):
    """The services a scrape reads gauges from (the runtime's ``Gateway``).
    Called at scrape time only, never while the metrics are made."""

    @property
    def clock(self) -> Callable[[], float]: ...
    def config_version(self) -> str: ...
    def actor_statistics(self) -> ActorCounts: ...
    def store_statistics(self) -> StoreStatistics: ...
    def requests_in_flight(self) -> int:
        """Requests on the active config's pipeline, received and not yet answered."""
        ...

    def upstream_statistics(self) -> Iterable[UpstreamCounts]: ...


class _Histogram:
    """One labelled histogram's state: a count per bucket (not cumulative:
    the observation adds one to one slot, found by bisection) and the sum.
    Made cumulative, with ``+Inf``, only when scraped."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)  # the last slot is above every bound
        self.total = 0.0


class _RouteStats:
    """What one route's requests update, found with one dict lookup."""

    __slots__ = ("duration", "overhead", "retries")

    def __init__(self) -> None:
        self.duration = _Histogram(len(DURATION_BUCKETS))
        self.overhead = _Histogram(len(OVERHEAD_BUCKETS))
        self.retries = 0


class Metrics:
    """The gateway's metrics. ``observe`` is its telemetry observer;
    ``render`` answers a scrape.

    ``observe`` runs once per request, so it only bumps plain ints and floats
    in dicts (a prometheus_client ``Histogram.observe`` takes a lock and walks
    the bounds, several microseconds for the three histograms); the
    Prometheus families are built from those numbers when scraped."""

    def __init__(self, sources: ScrapeSources, *, access_log: AccessLog | None = None) -> None:
        self.sources = sources
        self.access_log = access_log
        self.started_at = sources.clock()
        self.registry = CollectorRegistry()
        # Keyed by (route, status, outcome): the status class is derived at
        # scrape time, so the hot path formats no string.
        self._requests: dict[tuple[str, int, str], int] = {}
        self._routes: dict[str, _RouteStats] = {}
        self._upstreams: dict[str, _Histogram] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self.registry.register(_RequestCollector(self))
        self.registry.register(_GatewayCollector(self))
        # process_* (memory, CPU, open files, start time), read from /proc
        # when scraped; the scraping process's own, so worker 0's.
        ProcessCollector(registry=self.registry)

    def __repr__(self) -> str:
        return f"<Metrics {len(self._requests)} label sets>"

    def observe(self, record: RequestRecord) -> None:
        route = record.route or NO_ROUTE
        outcome = record.outcome
        key = (route, record.status, outcome)
        requests = self._requests
        # One lookup and one store: a tuple is hashed on each.
        requests[key] = requests.get(key, 0) + 1
        stats = self._routes.get(route)
        if stats is None:
            stats = self._routes[route] = _RouteStats()
        duration = record.duration_seconds
        h = stats.duration
        h.counts[bisect_left(DURATION_BUCKETS, duration)] += 1
        h.total += duration
        upstream_seconds = record.upstream_seconds
        if upstream_seconds is None:
            overhead = duration
        else:
            overhead = duration - upstream_seconds
            if overhead < 0.0:
                overhead = 0.0
        h = stats.overhead
        h.counts[bisect_left(OVERHEAD_BUCKETS, overhead)] += 1
        h.total += overhead
        if upstream_seconds is not None:
            upstream = record.upstream or NO_ROUTE
            h2 = self._upstreams.get(upstream)
            if h2 is None:
                h2 = self._upstreams[upstream] = _Histogram(len(DURATION_BUCKETS))
            h2.counts[bisect_left(DURATION_BUCKETS, upstream_seconds)] += 1
            h2.total += upstream_seconds
        if record.retries:
            stats.retries += record.retries
        if outcome in UPSTREAM_ERRORS:
            error_key = (record.upstream or NO_ROUTE, outcome)
            errors = self._errors
            if error_key in errors:
                errors[error_key] += 1
            else:
                errors[error_key] = 1

    def render(self) -> tuple[bytes, str]:
        """The exposition (Prometheus text format) and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _histogram(
    name: str,
    documentation: str,
    label: str,
    bounds: Sequence[float],
    states: Iterable[tuple[str, _Histogram]],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    # prometheus_client's own formatting of a bound (it is untyped).
    les = [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]
    for value, h in states:
        running = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(les, h.counts, strict=True):
            running += count
            buckets.append((le, running))
        family.add_metric([value], buckets, h.total)
    return family


class _RequestCollector(Collector):
    """The per-request counters and histograms, from ``Metrics``' plain
    numbers, in the shape prometheus_client's Counter and Histogram had."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "triogate_requests",
            "Answered requests by route, status class and outcome "
            "(ok, upstream_error, or the gateway's error code)",
            labels=["route", "status_class", "outcome"],
        )
        # Several statuses share a class: merge them.
        merged: dict[tuple[str, str, str], int] = {}
        for (route, status, outcome), count in list(m._requests.items()):
            labels = (route, f"{status // 100}xx", outcome)
            merged[labels] = merged.get(labels, 0) + count
        for labels, count in merged.items():
            requests.add_metric(labels, count)
        yield requests
        routes = list(m._routes.items())
        yield _histogram(
            "triogate_request_duration_seconds",
            "Whole requests as the gateway saw them, upstream included",
            "route",
            DURATION_BUCKETS,
            ((route, s.duration) for route, s in routes),
        )
        yield _histogram(
            "triogate_gateway_overhead_seconds",
            "The gateway's own time per request: duration less upstream time",
            "route",
            OVERHEAD_BUCKETS,
            ((route, s.overhead) for route, s in routes),
        )
        yield _histogram(
            "triogate_upstream_duration_seconds",
            "Waiting for the upstream's answer head, summed over retries",
            "upstream",
            DURATION_BUCKETS,
            list(m._upstreams.items()),
        )
        errors = CounterMetricFamily(
            "triogate_upstream_errors",
            "Requests answered with an upstream error by the gateway",
            labels=["upstream", "code"],
        )
        for key, count in list(m._errors.items()):
            errors.add_metric(key, count)
        yield errors
        retries = CounterMetricFamily(
            "triogate_retries", "Upstream retries (the retry plugin)", labels=["route"]
        )
        for route, s in routes:
            retries.add_metric([route], s.retries)
        yield retries


class _GatewayCollector(Collector):
    """Gauges read from the gateway's services when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        yield from self._info()
        yield from self._actors()
        yield from self._storage()
        yield from self._upstreams()
        yield from self._access_log()

    def _info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "triogate_info", "The running version and config version", labels=["version", "config"]
        )
        info.add_metric([__version__, self.metrics.sources.config_version()], 1)
        yield info

    def _actors(self) -> Iterator[Metric]:
        sources = self.metrics.sources
        s = sources.actor_statistics()
        yield GaugeMetricFamily("triogate_actors_live", "Per-key actors in memory", s.live_actors)
        yield GaugeMetricFamily(
            "triogate_actors_dirty", "Actors with state not yet flushed to storage", s.dirty
        )
        yield CounterMetricFamily(
            "triogate_actor_flushes", "Actor flushes to storage (write transactions)", s.flushes
        )
        yield CounterMetricFamily(
            "triogate_actor_evictions", "Idle actors flushed and evicted", s.evicted
        )
        # Flush lag: how long unflushed state may have waited. Nothing dirty,
        # nothing waits; otherwise the time since the last flush (or since
        # start, before the first one).
        last = s.last_flush_at if s.last_flush_at is not None else self.metrics.started_at
        lag = max(0.0, sources.clock() - last) if s.dirty else 0.0
        yield GaugeMetricFamily(
            "triogate_actor_flush_lag_seconds",
            "Seconds since the last flush while actors have unflushed state (else 0)",
            lag,
        )

    def _storage(self) -> Iterator[Metric]:
        s = self.metrics.sources.store_statistics()
        yield GaugeMetricFamily("triogate_storage_size_bytes", "Storage size on disk", s.size_bytes)
        yield GaugeMetricFamily(
            "triogate_storage_queued_writes", "Writes waiting for the writer", s.queued_writes
        )
        yield CounterMetricFamily("triogate_storage_commits", "Write transactions", s.commits)
        yield GaugeMetricFamily(
            "triogate_storage_map_size_bytes",
            "The size writes must fit in (storage.map_size_mb)",
            s.map_size_bytes,
        )
        yield CounterMetricFamily(
            "triogate_storage_full",
            "Writes refused because storage was full (507 STORAGE_FULL)",
            s.full_errors,
        )

    def _upstreams(self) -> Iterator[Metric]:
        sources = self.metrics.sources
        in_flight = GaugeMetricFamily(
            "triogate_upstream_in_flight", "Requests in flight to an upstream", labels=["upstream"]
        )
        healthy = GaugeMetricFamily(
            "triogate_upstream_target_healthy",
            "1 when active health checks (if any) pass for the target",
            labels=["upstream", "target"],
        )
        active = GaugeMetricFamily(
            "triogate_upstream_target_connections",
            "Connections to the target in use",
            labels=["upstream", "target"],
        )
        breaker = GaugeMetricFamily(
            "triogate_breaker_state",
            "Circuit breaker per target: 0 closed, 1 half_open, 2 open",
            labels=["upstream", "target"],
        )
        opened = CounterMetricFamily(
            "triogate_breaker_opened",
            "Times the target's breaker opened",
            labels=["upstream", "target"],
        )
        # The active config's pipeline (a retiring one, after a reload, still
        # finishes its own requests uncounted here).
        yield GaugeMetricFamily(
            "triogate_in_flight_requests",
            "Requests being handled: received and not yet answered",
            sources.requests_in_flight(),
        )
        for stats in sources.upstream_statistics():
            name = stats.name
            in_flight.add_metric([name], stats.in_flight)
            for target in stats.targets:
                labels = [name, target.target]
                healthy.add_metric(labels, 1 if target.healthy else 0)
                active.add_metric(labels, target.active)
                snapshot = target.breaker
                if snapshot is not None:
                    breaker.add_metric(labels, BREAKER_STATES[snapshot.state])
                    opened.add_metric(labels, snapshot.opened)
        yield from (in_flight, healthy, active, breaker, opened)

    def _access_log(self) -> Iterator[Metric]:
        access_log = self.metrics.access_log
        if access_log is None:
            return
        s = access_log.statistics()
        yield CounterMetricFamily(
            "triogate_access_log_dropped",
            "Access log lines dropped (queue full or write failed)",
            s.dropped,
        )
        yield CounterMetricFamily(
            "triogate_access_log_written", "Access log lines written", s.written
        )
        yield GaugeMetricFamily(
            "triogate_access_log_queued", "Access log lines waiting to be written", s.queued
        )
