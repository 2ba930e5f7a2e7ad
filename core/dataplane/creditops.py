"""The owner's side of credit operations and of validate's limit state
(``control.credits.Meter``): what the actors (one process) or the workers'
shared table (``server.workers > 1``) do when the admin API changes a balance
or asks what a key's next request would meet.

A cluster node (``[cluster] redis_url``): the balance is Redis's, and an
operation is one script run there (``cluster.credits.change_credits``),
mirrored into the actor and written to this node's usage record as Redis
answered it; validate decides in Redis too (a peek is a decision of cost 0,
a spend is the request path's own decision, with its fallback).

One process: an operation is applied synchronously in the actor, between
two requests (atomic under trio), and kept as a negative spend (``taken``),
so the flush merges it into storage as it merges spending
(``usageflush.merge_usage``). Several workers: one write transaction of the
shared table (``SharedLimits.change_credits``), serialised with every
worker's decisions. Either way the actor is flushed at once, so the answer's
balance is in storage before it is given.

Validate builds the key's limits and balances exactly as the data plane
does for a request on no particular route (a limit bound to routes does not
apply), so it reports what the next request meets: a peek decides each limit
for a cost of 0 and changes nothing; a ``spend`` is ``keyadmit.grant``, the
request path's own admission.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import msgspec

from triogate.cluster.credits import change_credits, records_writable
from triogate.control.credits import MAX_BALANCE, CreditChange, MeterState
from triogate.control.keyresolve import CreditsFrom, KeyAccess
from triogate.control.models import LimitStateView
from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.keyactor import KeyActor
from triogate.dataplane.keyadmit import LimitTables, grant, lowest_balance, report_spent
from triogate.policy.creditversion import older_credits
from triogate.policy.ratelimit import Decision, Limit, decide
from triogate.storage import KeyRecord, Table, UsageRecord, WriteTxn, codec

__all__ = ["ActorMeter"]

log = logging.getLogger("triogate.dataplane.creditops")

_Items = list[tuple[KeyActor, Limit]]
_Credits = list[tuple[KeyActor, CreditsFrom]]


def _seconds(value: float) -> int:
    # As the RateLimit headers round (``ratelimit._seconds``).
    return max(0, math.ceil(value - 1e-6))


def _views(decisions: list[Decision]) -> list[LimitStateView]:
    return [
        LimitStateView(
            name=d.limit.name,
            limit=d.limit.limit,
            remaining=d.remaining,
            reset_seconds=_seconds(d.reset),
        )
        for d in decisions
    ]


def _severity(d: Decision) -> tuple[bool, int, float]:
    return (d.allowed, d.remaining, -d.retry_after)


class ActorMeter:
    """``control.credits.Meter`` over an ``ActorRegistry``. ``default_limit``
    says the active config's ``[keys] default_rate_limit``."""

    def __init__(
        self, actors: ActorRegistry, default_limit: Callable[[], Limit | None] = lambda: None
    ) -> None:
        self._actors = actors
        self._default_limit = default_limit
        self._tables = LimitTables()

    def __repr__(self) -> str:
        return f"<ActorMeter {self._actors!r}>"

    # ---- operations ------------------------------------------------------------------

    async def change(
        self,
        subject: str,
        source: CreditsFrom,
        change: CreditChange,
        now: float,
        *,
        identity: bool = False,
    ) -> tuple[int, int] | None:
        actors = self._actors
        actor = actors.actor(subject)
        actor.last_active = now
        shared = actors.shared
        cluster = actors.cluster
        if cluster is not None:
            records_writable(actors.store)
            changed = await change_credits(
                cluster, actor, source, change.op, change.amount, now, most=MAX_BALANCE
            )
            if changed is None:
                return None
        elif shared is not None:
            changed = shared.change_credits(actor, source, now, change)
            if changed is None:
                return None
        else:
            actor.sync_credits(source, now)
            old = actor.credits
            if old is None:
                return None
            new = change(old)  # raises for a refused operation: nothing changed
            actor.credits = new
            # Merged into storage as spending is: a top-up is a negative spend.
            actor.taken -= new - old
            changed = (old, new)
        actor._touch()
        old, new = changed
        hook = actors.on_spent
        if hook is not None and new < old:
            # A key's balance is its rotation chain's: reported under the state key.
            hook(subject, source.credits, new, old - new, subject if identity else None)
        try:
            await actors.flush([actor])
            if cluster is not None:
                await actors.store.write(lambda txn: _store_balance(txn, actor))
        except Exception:
            # Applied and kept in memory: the flusher writes it on its next round.
            log.warning("a credit operation on %s is applied but not flushed yet", subject)
        return changed

    # ---- validate --------------------------------------------------------------------

    def _parts(self, consumer: KeyRecord | KeyAccess) -> tuple[_Items, _Credits, KeyActor]:
        """The limits and balances a request of ``consumer`` on no route meets
        (as ``plugin_services.ActorLimiter`` builds them)."""
        actors = self._actors
        if isinstance(consumer, KeyAccess):
            rate_limits, credits_from = consumer.rate_limits, consumer.credits
        else:
            rate_limits = consumer.rate_limits
            credits_from = consumer if consumer.credits is not None else None
        key_actor = actors.actor(consumer.state_key)
        items: _Items = []
        if rate_limits:
            items.extend((key_actor, lim) for lim in self._tables.get(rate_limits).on(""))
        else:
            default = self._default_limit()
            if default is not None:
                items.append((key_actor, default))
        credits: _Credits = []
        if credits_from is not None:
            credits.append((key_actor, credits_from))
        if isinstance(consumer, KeyAccess):
            pool, identity = consumer.pool, consumer.identity
            if pool is not None and identity is not None:
                pool_actor = actors.actor(identity.id)
                if pool.rate_limits:
                    table = self._tables.get(pool.rate_limits)
                    items.extend((pool_actor, lim) for lim in table.on(""))
                if consumer.pool_credits is not None:
                    credits.append((pool_actor, consumer.pool_credits))
        return items, credits, key_actor

    async def state(self, consumer: KeyRecord | KeyAccess, spend: int, now: float) -> MeterState:
        items, credits, key_actor = self._parts(consumer)
        if self._actors.cluster is not None:
            return await self._cluster_state(consumer, items, credits, key_actor, spend, now)
        if spend > 0:
            return self._spend(consumer, items, credits, key_actor, spend, now)
        shared = self._actors.shared
        if shared is not None:
            decisions = shared.peek([(actor.key, limit) for actor, limit in items], credits, now)
        else:
            decisions = [decide(limit, actor.limit_state(limit), now, 0) for actor, limit in items]
            for actor, source in credits:
                actor.sync_credits(source, now)
        decisions.sort(key=_severity)
        balance = lowest_balance(credits) if credits else None
        return MeterState(balance, _views(decisions))

    async def _cluster_state(
        self,
        consumer: KeyRecord | KeyAccess,
        items: _Items,
        credits: _Credits,
        key_actor: KeyActor,
        spend: int,
        now: float,
    ) -> MeterState:
        """On a cluster node: decided in Redis. A peek (cost 0) takes
        nothing and reports the cluster's balance and limits; when Redis
        does not answer, the balance this node last had from the cluster
        and no limits. A spend is the request path's decision, with its
        fallback (``deny``: 503 ``LIMITS_UNAVAILABLE``)."""
        cluster = self._actors.cluster
        assert cluster is not None
        wire = [(actor.key, limit) for actor, limit in items]
        for actor, _ in items:
            actor.last_active = now
        if spend <= 0:
            peeked = await cluster.peek(wire, credits, now)
            balance = lowest_balance(credits) if credits else None
            return MeterState(balance, _views(peeked) if peeked is not None else [])
        decisions, reservation, short = await cluster.grant(wire, credits, now, spend)
        balance = lowest_balance(credits) if credits else None
        if reservation is None:
            refused = "QUOTA_EXCEEDED" if short is not None else "RATE_LIMITED"
            return MeterState(0 if short is not None else balance, _views(decisions), refused)
        taken = [actor for actor, _ in credits if actor.credits is not None]
        for actor in taken:
            actor.taken += spend
            actor._touch()
        hook = self._actors.on_spent
        if taken and hook is not None:
            if isinstance(consumer, KeyAccess):
                report_spent(hook, consumer, credits, key_actor, spend)
            else:
                hook(consumer.id, consumer.credits, balance or 0, spend, None)
        return MeterState(balance, _views(decisions))

    def _spend(
        self,
        consumer: KeyRecord | KeyAccess,
        items: _Items,
        credits: _Credits,
        key_actor: KeyActor,
        spend: int,
        now: float,
    ) -> MeterState:
        actors = self._actors
        result = grant(actors, items, credits, now, spend)
        refused = None
        balance = lowest_balance(credits) if credits else None
        if not result.allowed:
            refused = "QUOTA_EXCEEDED" if result.short is not None else "RATE_LIMITED"
            if result.short is not None:
                balance = 0
        elif result.taken and actors.on_spent is not None:
            if isinstance(consumer, KeyAccess):
                report_spent(actors.on_spent, consumer, credits, key_actor, spend)
            else:
                actors.on_spent(consumer.id, consumer.credits, balance or 0, spend, None)
        return MeterState(balance, _views(result.decisions), refused)


def _store_balance(txn: WriteTxn, actor: KeyActor) -> None:
    """Keep this node's stored balance the one Redis answered (the usage
    flush merges spending, which would keep the lower of a top-up and what
    it stored): the views, a restart and the fallback start from it."""
    key = actor.key.encode()
    raw = txn.get(Table.USAGE, key)
    old = UsageRecord() if raw is None else codec.usage.decode(raw)
    if older_credits(actor.credits_version, old.credits_version):
        return  # a newer PATCH's balance is stored: the actor learns it from the record
    txn.put(
        Table.USAGE,
        key,
        codec.encode(
            msgspec.structs.replace(
                old,
                credits_remaining=actor.credits,
                credits_version=actor.credits_version,
                credits_refilled_at=actor.credits_refilled_at,
            )
        ),
    )
