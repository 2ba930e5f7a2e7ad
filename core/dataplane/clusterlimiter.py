"""The data plane's ``Limiter`` on a cluster node: a key's limits and
credits (and its identity's pool) and a route's limits decided by the
cluster's Redis (``triogate.cluster.limits.ClusterLimits``), exact across
nodes.

Theory of operation
-------------------
``plugin_env`` hands this limiter to the plugins instead of ``ActorLimiter``
only when ``[cluster] redis_url`` is set (``ActorRegistry.cluster``), so a
single gateway's hot path is the same code as before: no await, no check.

A decision here waits for Redis (batched with the other requests of the
same scheduling tick), so ``admit_key_nowait`` and ``admit_nowait`` return
an awaitable, which key-auth and rate-limit hand back to the pipeline (the
``Limiter`` protocol allows it). The actors still count usage and keep the
balance the cluster last answered (mirrored by ``ClusterLimits``), which the
admin views show; each flush adds its counters to the cluster-wide usage
(``ActorRegistry`` calls ``ClusterLimits.add_usage``).

What stays on the node: limits of the routes and keyspaces listed in
``[cluster] local_routes`` / ``local_keyspaces`` (``is_local``) are decided
by this node's actors, so each node admits up to the full limit. A key with
credits is always decided by the cluster (a balance is never per node).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from triogate.control.keyresolve import KeyAccess
from triogate.dataplane.plugin_services import ActorLimiter, credits_header
from triogate.errors import QuotaExceeded, RateLimited
from triogate.plugins.contract import Consumer, Context
from triogate.policy.ratelimit import Limit, Reservation
from triogate.policy.refill import retry_after
from triogate.storage import KeyRecord

if TYPE_CHECKING:
    from triogate.cluster.limits import ClusterLimits
    from triogate.control.keyresolve import CreditsFrom
    from triogate.dataplane.actors import ActorRegistry
    from triogate.dataplane.keyactor import KeyActor
    from triogate.events.live import LiveEvents

__all__ = ["ClusterLimiter"]


class ClusterLimiter(ActorLimiter):
    """``ActorLimiter`` whose decisions are the cluster's (module doc)."""

    __slots__ = ("_cluster",)

    def __init__(
        self,
        actors: ActorRegistry,
        cluster: ClusterLimits,
        default_key_limit: Limit | None = None,
        events: LiveEvents | None = None,
    ) -> None:
        super().__init__(actors, default_key_limit, events)
        self._cluster = cluster

    def __repr__(self) -> str:
        return f"<ClusterLimiter {self._cluster!r}>"

    def admit_key_nowait(  # type: ignore[override]
        self, ctx: Context, consumer: Consumer, cost: int
    ) -> Awaitable[None] | None:
        if _metered(consumer):
            return self._admit_key(ctx, consumer, cost)
        route = ctx.route.name if ctx.route is not None else ""
        if self._cluster.is_local(route=route, keyspace=_keyspace(consumer)):
            super().admit_key_nowait(ctx, consumer, cost)
            return None
        return self._admit_key(ctx, consumer, cost)

    async def _admit_key(self, ctx: Context, consumer: Consumer, cost: int) -> None:
        actors = self._actors
        route = ctx.route.name if ctx.route is not None else ""
        if type(consumer) is KeyAccess:
            key_actor = actors.actor(consumer.state_key)
            items: list[tuple[KeyActor, Limit]] = []
            if consumer.rate_limits:
                table = self._tables.get(consumer.rate_limits)
                items.extend((key_actor, lim) for lim in table.on(route))
            elif self.default_key_limit is not None:
                items.append((key_actor, self.default_key_limit))
            credits: list[tuple[KeyActor, CreditsFrom]] = []
            if consumer.credits is not None:
                credits.append((key_actor, consumer.credits))
            pool, identity = consumer.pool, consumer.identity
            if pool is not None and identity is not None:
                pool_actor = actors.actor(identity.id)
                if pool.rate_limits:
                    table = self._tables.get(pool.rate_limits)
                    items.extend((pool_actor, lim) for lim in table.on(route))
                if consumer.pool_credits is not None:
                    credits.append((pool_actor, consumer.pool_credits))
        else:
            record: KeyRecord = consumer  # type: ignore[assignment]
            key_actor = actors.actor(record.state_key)
            limits = key_actor.key_limits(record, self.default_key_limit)
            if any(spec.routes for spec in record.rate_limits):
                limits = self._tables.get(record.rate_limits).on(route)
            items = [(key_actor, lim) for lim in limits]
            credits = [(key_actor, record)] if record.credits is not None else []
        if not items and not credits:
            return
        now = self._clock()
        for actor, _ in items:
            actor.last_active = now
        for actor, _ in credits:
            actor.last_active = now
        decisions, reservation, short = await self._cluster.grant(
            [(actor.key, lim) for actor, lim in items], credits, now, cost
        )
        ctx.rate_limits.extend(decisions)
        if credits:
            lowest = min((a.credits for a, _ in credits if a.credits is not None), default=0)
            credits_header(ctx, 0 if short is not None else lowest)
        if reservation is None:
            if short is not None:
                actor, source = credits[short]
                whose = "the key" if actor is key_actor else "the key's identity"
                error = QuotaExceeded(f"{whose} has no credits left", credits_remaining=0)
                error.headers["Retry-After"] = str(
                    retry_after(source.credits, actor.credits_refilled_at, now)
                )
                raise error
            if self._events is not None:
                self._events.rate_limited(consumer.id)
            raise RateLimited("the key's rate limit is exhausted; see Retry-After")
        taken = [actor for actor, _ in credits if actor.credits is not None]
        for actor in taken:
            actor.taken += cost
            actor._touch()
        events = self._events
        if events is not None:
            for actor, source in credits:
                if actor in taken:
                    pool_id = _identity_id(consumer) if actor is not key_actor else None
                    events.spent(consumer.id, source.credits, actor.credits, cost, pool_id)
        ctx.undo.append(lambda: self._undo(reservation, taken, cost))

    def _undo(self, reservation: Reservation | None, taken: list[KeyActor], cost: int) -> None:
        self._cluster.undo_soon(reservation, self._clock(), [(actor, cost) for actor in taken])
        for actor in taken:
            actor.taken -= cost
            actor._touch()

    def admit_nowait(  # type: ignore[override]
        self, ctx: Context, subject: str, limit: Limit, cost: int, *, key: bool
    ) -> Awaitable[None] | None:
        route = ctx.route.name if ctx.route is not None else ""
        if self._cluster.is_local(route=route):
            super().admit_nowait(ctx, subject, limit, cost, key=key)
            return None
        return self._admit_route(ctx, subject, limit, cost, key)

    async def _admit_route(
        self, ctx: Context, subject: str, limit: Limit, cost: int, key: bool
    ) -> None:
        actors = self._actors
        actor = actors.actor(subject) if key else actors.subject(subject)
        now = self._clock()
        actor.last_active = now
        decisions, reservation, _ = await self._cluster.decide([(subject, limit)], now, cost)
        ctx.rate_limits.extend(decisions)
        if reservation is None:
            if key and self._events is not None and ctx.consumer is not None:
                self._events.rate_limited(ctx.consumer.id)
            raise RateLimited("the route's rate limit is exhausted; see Retry-After")
        cluster, clock = self._cluster, self._clock
        ctx.undo.append(lambda: cluster.undo_soon(reservation, clock()))


def _metered(consumer: Consumer) -> bool:
    """Whether a request of ``consumer`` spends a balance (never per node)."""
    if type(consumer) is KeyAccess:
        return consumer.credits is not None or consumer.pool_credits is not None
    return getattr(consumer, "credits", None) is not None


def _keyspace(consumer: Consumer) -> str | None:
    record = consumer.record if type(consumer) is KeyAccess else consumer
    return getattr(record, "keyspace", None)


def _identity_id(consumer: Consumer) -> str | None:
    if type(consumer) is KeyAccess and consumer.identity is not None:
        return consumer.identity.id
    return None
