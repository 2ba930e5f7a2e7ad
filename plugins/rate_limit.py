"""``rate-limit``: a route's own limit, per key, per consumer, per client
address or for the whole route.

The key's own limits and credits are enforced by key-auth (they belong to
the key); this plugin adds the route's policy on top. ``by = "key"`` falls
back to the client address on requests without a key (as Kong does). The
state is the gateway's (``env.limiter``): a key's is kept with the key's
(persisted), one for a rotated key and its successor; an address's or a
route's lives in memory. A request this plugin refuses gets back whatever
key-auth took for it (the pipeline's undo), so it consumes nothing.

``by = "consumer"`` counts per authenticated consumer, whichever plugin
authenticated it: a verified token's subject (``ctx.subject``, set by jwt;
its state in memory, like an address's), else the API key (as ``key``),
else the client address. It is chosen once, in ``__init__``: the other
settings' requests do not pay for it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Literal

from msgspec import Meta

from triogate.plugins.contract import (
    Context,
    Limit,
    Plugin,
    PluginEnv,
    RateLimitConfig,
    RouteView,
    UpstreamView,
)
from triogate.policy.ratelimit import limit_from

__all__ = ["RateLimit"]


class RouteLimitConfig(RateLimitConfig, frozen=True, forbid_unknown_fields=True):
    """The shared ``RateLimitConfig`` (limit, period_seconds, algorithm) and
    whose requests count together, the policy's name and a request's cost."""

    by: Annotated[
        Literal["key", "consumer", "ip", "route"],
        Meta(
            description="whose requests are counted together: per key, per consumer (a "
            "token's subject, else the key), per address, or all"
        ),
    ] = "key"
    name: Annotated[
        str,
        Meta(
            pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
            description="policy name in the RateLimit headers (default: route-<by>)",
        ),
    ] = ""
    cost: Annotated[int, Meta(ge=1, le=1_000_000, description="units a request uses")] = 1


class RateLimit(Plugin[RouteLimitConfig]):
    name = "rate-limit"
    priority = 910
    Config = RouteLimitConfig

    def __init__(self, config: RouteLimitConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.display = config.name or f"route-{config.by}"
        self.cost = config.cost
        self._admit = env.limiter.admit_nowait  # bound once: called per request
        # Set by ``bind`` (one instance serves one route).
        self._route = "-"
        self._route_subject = "route:-"
        self._ip_prefix = "ip:-:"  # + the client's address: its subject
        self._limit = self._policy("-")
        self._subject_prefix = "sub:-:"  # + a token subject's state key
        if config.by == "consumer":
            self.access_nowait = self._by_consumer  # type: ignore[method-assign]

    def _policy(self, route: str) -> Limit:
        # Counted per route: in a key's state, each route's policy keeps its
        # own state even when two routes report the same policy name.
        return limit_from(self.config, self.display, f"route:{route}:{self.display}")

    def bind(self, route: RouteView, upstream: UpstreamView) -> None:
        self._route = route.name
        self._route_subject = f"route:{route.name}"
        self._ip_prefix = f"ip:{route.name}:"
        self._subject_prefix = f"sub:{route.name}:"
        self._limit = self._policy(route.name)

    def key_route_limit(self) -> tuple[Limit, int] | None:
        """For ``KeyAuth.fuse_access`` (plan time, after ``bind``): the
        route's limit and a request's cost when counted per key, so that
        key-auth right before this plugin admits them with the key's own
        (a request always has a key there); None otherwise."""
        if self.config.by != "key":
            return None
        return self._limit, self.cost

    def access_nowait(self, ctx: Context) -> Awaitable[None] | None:
        # None, or (a cluster node's limiter deciding in Redis) an awaitable.
        by = self.config.by
        if by == "route":
            return self._admit(ctx, self._route_subject, self._limit, self.cost, key=False)
        if by == "key" and ctx.consumer is not None:
            # A rotated key and its successor count as one key.
            return self._admit(ctx, ctx.consumer.state_key, self._limit, self.cost, key=True)
        return self._admit(ctx, self._ip_prefix + ctx.client_ip, self._limit, self.cost, key=False)

    def _by_consumer(self, ctx: Context) -> Awaitable[None] | None:
        subject = ctx.subject
        if subject is not None:
            prefix = self._subject_prefix
            return self._admit(ctx, prefix + subject.state_key, self._limit, self.cost, key=False)
        if ctx.consumer is not None:
            return self._admit(ctx, ctx.consumer.state_key, self._limit, self.cost, key=True)
        return self._admit(ctx, self._ip_prefix + ctx.client_ip, self._limit, self.cost, key=False)
