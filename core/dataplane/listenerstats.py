"""The native proxy listener's own counters as Prometheus metrics.

The listener belongs to the server, not to the gateway whose registry
``/metrics`` reads, so the server registers ``ListenerCollector`` with a
function that returns the listener's ``statistics()``; nothing is kept
between scrapes. (The hypercorn front door has no such listener.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from triogate.dataplane.listener import ListenerStatistics

__all__ = ["ListenerCollector"]


class ListenerCollector(Collector):
    def __init__(self, statistics: Callable[[], ListenerStatistics]) -> None:
        self.statistics = statistics

    def collect(self) -> Iterable[Metric]:
        s = self.statistics()
        yield GaugeMetricFamily(
            "triogate_listener_connections", "Open client connections", s.connections
        )
        yield GaugeMetricFamily(
            "triogate_listener_max_connections", "The connection cap in force", s.max_connections
        )
        yield CounterMetricFamily(
            "triogate_listener_accepted", "Client connections accepted", s.accepted
        )
        yield CounterMetricFamily(
            "triogate_listener_refused",
            "Client connections refused over the connection cap",
            s.refused,
        )
        yield CounterMetricFamily(
            "triogate_listener_tls_handshake_failures",
            "TLS handshakes that failed or timed out ([server.tls])",
            s.tls_failures,
        )
