"""WebSocket counts for ``GET /metrics``: connections open now, upgrades by
outcome, relays by how they ended.

One ``WebSocketStats`` per process (``STATS``): the relays of every listener
in it add to the same numbers (a process runs one gateway; with
``server.workers > 1`` each worker counts its own, as for requests). The
runtime registers ``WebSocketCollector(STATS)`` in the gateway's metrics
registry; the numbers are plain ints until a scrape reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["ENDINGS", "OUTCOMES", "STATS", "WebSocketCollector", "WebSocketStats"]

# How an upgrade request was answered.
UPGRADED: Final = "upgraded"  # 101 relayed: the connection is a WebSocket now
REFUSED: Final = "refused"  # the gateway said no (4xx: handshake, access phase, route)
FAILED: Final = "failed"  # the gateway could not reach a usable upstream (5xx)
DECLINED: Final = "declined"  # the upstream answered something else than 101 (relayed)
OUTCOMES: Final = (UPGRADED, REFUSED, FAILED, DECLINED)
ENDINGS: Final = ("closed", "idle", "too_big", "drain", "broken")


class WebSocketStats:
    __slots__ = ("ended", "open", "upgrades")

    def __init__(self) -> None:
        self.open = 0
        self.upgrades = dict.fromkeys(OUTCOMES, 0)
        self.ended = dict.fromkeys(ENDINGS, 0)

    def answered(self, status: int, from_gateway: bool) -> None:
        """Count an upgrade request by its answer."""
        if status == 101:
            outcome = UPGRADED
        elif not from_gateway:
            outcome = DECLINED
        else:
            outcome = FAILED if status >= 500 else REFUSED
        self.upgrades[outcome] += 1


STATS: Final = WebSocketStats()


class WebSocketCollector(Collector):
    def __init__(self, stats: WebSocketStats) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self.stats
        gauge = GaugeMetricFamily(
            "triogate_websocket_connections_open", "WebSocket connections being relayed now"
        )
        gauge.add_metric([], stats.open)
        yield gauge
        upgrades = CounterMetricFamily(
            "triogate_websocket_upgrades",
            "WebSocket upgrade requests by outcome: upgraded (101), refused (4xx by the "
            "gateway), failed (5xx by the gateway), declined (the upstream did not switch)",
            labels=["outcome"],
        )
        for outcome, count in stats.upgrades.items():
            upgrades.add_metric([outcome], count)
        yield upgrades
        ended = CounterMetricFamily(
            "triogate_websocket_closed",
            "Relayed WebSocket connections by how they ended",
            labels=["ending"],
        )
        for ending, count in stats.ended.items():
            ended.add_metric([ending], count)
        yield ended
