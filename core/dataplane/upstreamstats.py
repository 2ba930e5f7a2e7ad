"""What ``Upstream.statistics()`` reports (the admin API's upstreams view).

Apart from ``upstream`` because that module is compiled with mypyc, which
drops a msgspec Struct's class options (``frozen=True``).
"""

from __future__ import annotations

import msgspec

from triogate.policy.breaker import BreakerSnapshot

__all__ = ["TargetStatistics", "UpstreamStatistics"]


class TargetStatistics(msgspec.Struct, frozen=True):
    """One target's pool right now (``TargetPool.statistics()``)."""

    target: str
    active: int  # connections in use
    idle: int  # kept-alive connections waiting
    opened: int  # connections made in all
    healthy: bool  # active health checks (if any) pass
    breaker: BreakerSnapshot | None  # None: no circuit-breaker plugin on it
    tls_failures: int = 0  # https: connections whose TLS handshake failed


class UpstreamStatistics(msgspec.Struct, frozen=True):
    """One upstream right now (``Upstream.statistics()``)."""

    name: str
    balance: str
    in_flight: int
    retries_in_flight: int
    targets: tuple[TargetStatistics, ...]
