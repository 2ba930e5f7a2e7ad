"""``circuit-breaker``: stop sending to an upstream target that keeps failing.

The decisions are the pure state machine in ``triogate.policy.breaker``; this plugin
only gives each target of the route's upstream a breaker with these settings
(the first route to configure a target's breaker sets it). The upstream
client reports every exchange's outcome to the target's breaker, and its
balancer skips targets whose breaker is open: while every target of the
upstream is open the answer is 503 ``UPSTREAM_UNAVAILABLE`` with
``Retry-After``, at once, without touching the upstream.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.plugins.contract import (
    BreakerSettings,
    FailurePolicy,
    Plugin,
    PluginEnv,
    RouteView,
    UpstreamView,
)

__all__ = ["CircuitBreaker"]


class CircuitBreakerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    failure_threshold: Annotated[
        int, Meta(ge=1, le=10_000, description="consecutive failures that open the breaker")
    ] = 5
    error_rate_threshold: Annotated[
        float, Meta(gt=0, le=1, description="failure share over the window that opens it")
    ] = 0.5
    minimum_requests: Annotated[
        int, Meta(ge=1, le=1_000_000, description="requests in the window before the rate counts")
    ] = 20
    window_seconds: Annotated[
        float, Meta(gt=0, le=3600, description="the rolling window for the error rate")
    ] = 10.0
    open_seconds: Annotated[
        float, Meta(gt=0, le=86400, description="first open period, before half-open probes")
    ] = 10.0
    max_open_seconds: Annotated[
        float, Meta(gt=0, le=86400, description="cap of the growing open period")
    ] = 300.0
    growth: Annotated[
        float, Meta(ge=1, le=10, description="open period multiplier after a failed probe")
    ] = 2.0
    half_open_probes: Annotated[
        int, Meta(ge=1, le=1000, description="requests let through at once when half-open")
    ] = 1
    success_threshold: Annotated[
        int, Meta(ge=1, le=1000, description="successful probes that close the breaker")
    ] = 1
    failure_statuses: Annotated[
        list[Annotated[int, Meta(ge=100, le=599)]],
        Meta(description="statuses that count as failures (empty: every 5xx)"),
    ] = []
    count_timeouts: Annotated[bool, Meta(description="upstream timeouts are failures")] = True
    count_transport_errors: Annotated[
        bool, Meta(description="refused/reset connections and protocol errors are failures")
    ] = True

    def __post_init__(self) -> None:
        if self.max_open_seconds < self.open_seconds:
            raise ValueError("max_open_seconds must be at least open_seconds")


class CircuitBreaker(Plugin[CircuitBreakerConfig]):
    name = "circuit-breaker"
    priority = 500
    Config = CircuitBreakerConfig

    def __init__(self, config: CircuitBreakerConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.settings = BreakerSettings(
            failure_threshold=config.failure_threshold,
            error_rate_threshold=config.error_rate_threshold,
            minimum_requests=config.minimum_requests,
            window_seconds=config.window_seconds,
            open_seconds=config.open_seconds,
            max_open_seconds=config.max_open_seconds,
            growth=config.growth,
            half_open_probes=config.half_open_probes,
            success_threshold=config.success_threshold,
        )
        self.policy = FailurePolicy(
            statuses=frozenset(config.failure_statuses),
            transport_errors=config.count_transport_errors,
            timeouts=config.count_timeouts,
        )

    def bind(self, route: RouteView, upstream: UpstreamView) -> None:
        """Ask for a breaker on every target of the route's upstream. The
        first route of a config to ask sets its settings. Nothing changes
        until the whole config is applied; then a target that already has a
        breaker with the same settings (a reload) keeps it, and its state;
        changed settings give it a new one."""
        upstream.use_breaker(self.settings, self.policy)
