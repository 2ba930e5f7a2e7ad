"""One admission per request for key-auth followed by ``rate-limit`` by key.

Theory of operation
-------------------
A route with ``key-auth`` and ``rate-limit`` (``by = "key"``) decides two
things in the state of the same key: the key's own limits and credits
(key-auth) and the route's limit (rate-limit). Made as two calls, that is
two actor lookups, two clock reads, two admissions and two undo closures
per request. When the plan finds rate-limit's access phase right after
key-auth's (``plan._fuse_access``), key-auth takes the route's limit over
(``KeyAuth.fuse_access``) and admits both here, in one step, with the same
outcome as the two calls in a row:

* the key's limits first: refused, the request is the key's
  ``RATE_LIMITED`` with the key's decisions only (the route's limit was
  never reached); then its credits: short, ``QUOTA_EXCEEDED``;
* then the route's limit, in the key's actor: refused, the route's
  ``RATE_LIMITED`` with both decisions, and what the key's part took is
  given back by the pipeline's undo (as when rate-limit refused after
  key-auth);
* allowed: one undo gives back both parts if a later phase refuses.

The costs stay separate (key-auth's ``cost`` for the key's limits and
credits, rate-limit's for the route's limit). A key with a plan, an
identity or roles (``KeyAccess``), and the workers' shared table
(``ActorRegistry.shared``), take the two calls as before; a cluster node's
limiter is never fused (``ActorLimiter.key_route_admission``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from triogate.control.keyresolve import KeyAccess
from triogate.dataplane.plugin_services import _X_CREDITS, ActorLimiter, _quota, credits_header
from triogate.errors import RateLimited
from triogate.plugins.contract import Consumer, Context
from triogate.policy.ratelimit import Limit, Reservation, acquire, release

if TYPE_CHECKING:
    from triogate.dataplane.keyactor import KeyActor
    from triogate.storage import KeyRecord

__all__ = ["KeyRouteAdmission"]


class KeyRouteAdmission:
    """key-auth's admission of a key with the route's limit by key (the
    module doc); ``admit`` is what key-auth calls per request."""

    __slots__ = ("_limit", "_limiter", "_route_cost")

    def __init__(self, limiter: ActorLimiter, limit: Limit, route_cost: int) -> None:
        self._limiter = limiter
        self._limit = limit
        self._route_cost = route_cost

    def __repr__(self) -> str:
        return f"<KeyRouteAdmission {self._limit.name}>"

    def admit(self, ctx: Context, consumer: Consumer, cost: int) -> None:
        limiter = self._limiter
        actors = limiter._actors
        if type(consumer) is KeyAccess or actors.shared is not None:
            # The two calls in a row, as without the fusion.
            limiter.admit_key_nowait(ctx, consumer, cost)
            limiter.admit_nowait(ctx, consumer.state_key, self._limit, self._route_cost, key=True)
            return
        record: KeyRecord = consumer  # type: ignore[assignment]
        actor = actors.actor(record.state_key)
        limits = actor.key_limits(record, limiter.default_key_limit)
        if record.rate_limits:
            for spec in record.rate_limits:
                if spec.routes:  # route-bound: only those of this route apply
                    route = ctx.route
                    table = limiter._tables.get(record.rate_limits)
                    limits = table.on(route.name if route is not None else "")
                    break
        now = limiter._clock()
        actor.last_active = now
        rate_limits = ctx.rate_limits
        key_taken: Reservation | None = None
        taken = 0
        if limits or record.credits is not None:
            key_taken, taken = _admit_key(limiter, ctx, record, actor, limits, now, cost)
        limit = self._limit
        entry = actor._limits.get(limit.state_key or limit.name)
        state = entry[1] if entry is not None and entry[0] is limit else actor.limit_state(limit)
        decisions, reservation = acquire(((limit, state),), now, self._route_cost)
        rate_limits.append(decisions[0])
        if reservation is None:
            if key_taken is not None:
                # Given back by the pipeline, as rate-limit's refusal after
                # key-auth's admission was.
                clock = limiter._clock
                ctx.undo.append(lambda: _give_back(actor, key_taken, None, taken, clock()))
            events = limiter._events
            if events is not None:
                events.rate_limited(record.id)
            raise RateLimited("the route's rate limit is exhausted; see Retry-After")
        if not actor.dirty:  # ``_touch`` without a call once marked
            actor._touch()
        clock = limiter._clock
        ctx.undo.append(lambda: _give_back(actor, key_taken, reservation, taken, clock()))


def _admit_key(
    limiter: ActorLimiter,
    ctx: Context,
    record: KeyRecord,
    actor: KeyActor,
    limits: Sequence[Limit],
    now: float,
    cost: int,
) -> tuple[Reservation, int]:
    """The key's own limits and credits, as ``ActorLimiter.admit_key_nowait``
    decides them for a key record: what was reserved and the credits taken;
    a refusal raised."""
    actor.sync_credits(record, now)
    states = actor._limits
    # A tuple: the reservation keeps it as it is.
    items = tuple(
        [
            (limit, entry[1])
            if (entry := states.get(limit.state_key or limit.name)) is not None
            and entry[0] is limit
            else (limit, actor.limit_state(limit))
            for limit in limits
        ]
    )
    decisions, reservation = acquire(items, now, cost)
    ctx.rate_limits.extend(decisions)
    metered = record.credits is not None
    if reservation is None:
        if metered:
            credits_header(ctx, actor.credits if actor.credits is not None else 0)
        if limiter._events is not None:
            limiter._events.rate_limited(record.id)
        raise RateLimited("the key's rate limit is exhausted; see Retry-After")
    taken = 0
    balance = actor.credits
    if balance is not None:
        if balance < cost:
            release(reservation, now)
            if metered:
                credits_header(ctx, 0)
            raise _quota(record, actor, now, "the key has no credits left")
        actor.credits = balance = balance - cost
        actor.taken += cost
        taken = cost
    if metered:
        # ``credits_header``, inlined.
        ctx.response_headers.append((_X_CREDITS, b"%d" % (balance if balance is not None else 0)))
    if taken and limiter._events is not None:
        limiter._events.spent(record.id, record.credits, balance, cost)
    return reservation, taken


def _give_back(
    actor: KeyActor,
    key_taken: Reservation | None,
    route_taken: Reservation | None,
    credits: int,
    now: float,
) -> None:
    """What ``KeyActor.undo_nowait`` does for each part (one process)."""
    if key_taken is not None:
        release(key_taken, now)
    if route_taken is not None:
        release(route_taken, now)
    if credits and actor.credits is not None:
        actor.credits += credits
        actor.taken -= credits
    actor._touch()  # the refund must reach storage even after a flush
