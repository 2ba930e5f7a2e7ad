"""``rate-limit``: a route's own limit, per key, per client address or for
the whole route.

The key's own limits and credits are enforced by key-auth (they belong to
the key); this plugin adds the route's policy on top. ``by = "key"`` falls
back to the client address on requests without a key (as Kong does). The
state lives in the actors: a key's in its (persisted) actor, one for a
rotated key and its successor; an address's or a route's in an unpersisted
subject actor. A request this plugin refuses gets back whatever key-auth
took for it (the pipeline's undo), so it consumes nothing.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from triogate.dataplane.actors import RateLimited
from triogate.plugins.contract import Context, Plugin, PluginEnv, Response
from triogate.policy.ratelimit import Limit

__all__ = ["RateLimit"]


class RateLimitConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=1_000_000_000, description="requests per period")]
    period_seconds: Annotated[float, Meta(ge=0.001, le=31_536_000, description="period length")]
    by: Annotated[
        Literal["key", "ip", "route"],
        Meta(description="whose requests are counted together: per key, per address, or all"),
    ] = "key"
    algorithm: Annotated[
        Literal["gcra", "sliding_window"],
        Meta(description="gcra (exact, smooth) or sliding_window (counts per window)"),
    ] = "gcra"
    name: Annotated[
        str,
        Meta(
            pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
            description="policy name in the RateLimit headers (default: route-<by>)",
        ),
    ] = ""
    cost: Annotated[int, Meta(ge=1, le=1_000_000, description="units a request uses")] = 1


class RateLimit(Plugin[RateLimitConfig]):
    name = "rate-limit"
    priority = 910
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.display = config.name or f"route-{config.by}"
        self._policies: dict[str, Limit] = {}

    def _policy(self, route: str) -> Limit:
        # Counted per route: in a key's actor, each route's policy keeps its
        # own state even when two routes report the same policy name.
        policy = self._policies.get(route)
        if policy is None:
            cfg = self.config
            policy = Limit(
                self.display,
                cfg.limit,
                cfg.period_seconds,
                cfg.algorithm,
                state_key=f"route:{route}:{self.display}",
            )
            self._policies[route] = policy
        return policy

    def _subject(self, ctx: Context, route: str) -> str:
        if self.config.by == "route":
            return f"route:{route}"
        if self.config.by == "key" and ctx.consumer is not None:
            # A rotated key and its successor count as one key.
            return ctx.consumer.state_key
        return f"ip:{route}:{ctx.client_ip}"

    async def access(self, ctx: Context) -> Response | None:
        actors = self.env.actors
        if actors is None:
            return None
        route = getattr(ctx.route, "name", "-")
        subject = self._subject(ctx, route)
        actor = actors.actor(subject) if subject.startswith("key_") else actors.subject(subject)
        now = actors.clock()
        admission = actor.admit_nowait((self._policy(route),), now, cost=self.config.cost)
        ctx.rate_limits.extend(admission.decisions)
        if not admission.allowed:
            raise RateLimited("the route's rate limit is exhausted; see Retry-After")
        ctx.undo.append(lambda: actor.undo_nowait(admission, actors.clock()))
        return None
