"""Limits and credits decided by the cluster: ``ClusterLimits``, what the
data plane calls where it calls ``SharedLimits`` with several workers.

Theory of operation
-------------------
A decision is one ``DECIDE`` script run (``decide.py``, ``lua.py``), queued
on the batcher with the other requests of the same scheduling tick. The
balances a request spends from are synced first by their actors
(``sync_credits``: a new credits version, a refill due), sent along, and
mirrored back from the reply, so the actors (views, flushes, ``/keys``)
show the cluster's balance.

When Redis is unreachable (the link says so, or the decision fails or
takes longer than ``command_timeout_seconds``) the configured fallback
decides:

* ``local``: this process decides on its own states (as a single gateway
  would; each node then admits up to the full limit) and spends the
  actor's balance, remembering what it spent (a *debt*); the debt is
  charged to the cluster's balance by the next decision for that balance
  once Redis answers again (never below zero). Limiter states of the
  outage are not merged back: the limits simply go on from Redis's states.
* ``deny``: ``LimitsUnavailable`` (503 ``LIMITS_UNAVAILABLE``, with
  ``Retry-After``).

A decision that timed out may still run in Redis later: its late answer, if
it granted, is undone at once, so a request decided locally is not also
counted (or charged) by the cluster.

Routes and keyspaces listed in ``[cluster] local_routes`` /
``local_keyspaces`` skip Redis for their rate limits (``is_local``): no
round trip, and each node admits up to the full limit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from triogate.cluster.batcher import Batcher
from triogate.cluster.decide import (
    DEFAULT_NAMESPACE,
    Balance,
    BalanceAfter,
    ClusterState,
    Verdict,
    decide_call,
    parse_decide,
    undo_call,
    usage_call,
    usage_key,
)
from triogate.cluster.lua import DECIDE, UNDO, USAGE
from triogate.cluster.redis import REDIS_ERRORS, RedisLink, open_redis
from triogate.cluster.resp import RespPath, target_of
from triogate.config import ClusterConfig
from triogate.errors import LimitsUnavailable
from triogate.policy.ratelimit import Decision, Limit, LimitState, Reservation, acquire, release

__all__ = ["ClusterLimits", "CreditHolder", "Decided", "Granted", "open_cluster_limits"]

log = logging.getLogger("triogate.cluster.limits")

#: (decisions, reservation or None, whether the credits sufficed): ``SharedLimits.decide``'s.
Decided = tuple[list[Decision], Reservation | None, bool]
#: (decisions, reservation or None, the index of the balance that was short).
Granted = tuple[list[Decision], Reservation | None, int | None]

ERROR_LOG_INTERVAL = 60.0


class CreditHolder(Protocol):
    """What a balance's owner is (a ``KeyActor``): its id and its view of the balance."""

    key: str
    credits: int | None
    credits_version: int
    credits_refilled_at: float | None

    def sync_credits(self, record: Any, now: float) -> None: ...


def _refill_amount(record: Any) -> int:
    spec = getattr(record, "credits", None) if record is not None else None
    return int(getattr(spec, "refill_amount", 0) or 0)


class ClusterLimits:
    """Decisions in Redis with a fallback (module doc). One per process."""

    def __init__(
        self,
        link: RedisLink,
        batcher: Batcher,
        config: ClusterConfig,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        redis_clock: bool = True,
    ) -> None:
        self.link = link
        self.batcher = batcher
        self.config = config
        self.namespace = namespace
        #: Decide at Redis's time (one clock for every node) rather than the caller's.
        self.redis_clock = redis_clock
        self._local_routes = frozenset(config.local_routes)
        self._local_keyspaces = frozenset(config.local_keyspaces)
        self._local: dict[tuple[str, str], LimitState] = {}  # the fallback's states
        #: subject -> (credits version, credits spent here while Redis was away)
        self._debt: dict[str, tuple[int, int]] = {}
        self._error_logged_at = -math.inf
        self.fallbacks = 0
        self.late_undos = 0

    def __repr__(self) -> str:
        return f"<ClusterLimits {self.link!r} fallback={self.config.fallback}>"

    def is_local(self, *, route: str | None = None, keyspace: str | None = None) -> bool:
        """Whether limits on ``route`` / of keys of ``keyspace`` are this node's alone."""
        return route in self._local_routes or keyspace in self._local_keyspaces

    # ---- deciding ------------------------------------------------------------------

    async def decide(
        self,
        items: Sequence[tuple[str, Limit]],
        now: float,
        cost: int = 1,
        *,
        credits: CreditHolder | None = None,
        record: Any = None,
    ) -> Decided:
        """``SharedLimits.decide``'s contract, awaited: the limits of
        ``items`` (subject, limit) together and, if they allow, ``cost`` from
        ``credits``' balance, all-or-nothing."""
        balances = [(credits, record)] if credits is not None else []
        decisions, reservation, short = await self.grant(items, balances, now, cost)
        return decisions, reservation, short is None

    async def grant(
        self,
        items: Sequence[tuple[str, Limit]],
        balances: Sequence[tuple[CreditHolder, Any]],
        now: float,
        cost: int = 1,
    ) -> Granted:
        """The limits of ``items`` and ``cost`` from every balance of
        ``balances`` (an actor and the record its credits sync from), all or
        nothing, in one script run. The short balance's index on a refusal
        for credits."""
        verdict, sent = await self._remote(items, balances, now, cost)
        if verdict is not None:
            short = sent[verdict.short] if verdict.short is not None else None
            return verdict.decisions, verdict.reservation, short
        return self._fallback(items, balances, now, cost)

    async def peek(
        self,
        items: Sequence[tuple[str, Limit]],
        balances: Sequence[tuple[CreditHolder, Any]],
        now: float,
    ) -> list[Decision] | None:
        """What the next request meets, from Redis (a decision of cost 0:
        it takes nothing; the balances are reconciled and mirrored as a
        decision would). None when Redis does not answer: the actors then
        keep the balance they last had from the cluster."""
        verdict, _ = await self._remote(items, balances, now, 0)
        if verdict is None:
            for holder, record in balances:
                holder.sync_credits(record, now)
            return None
        return verdict.decisions

    def balance_of(self, holder: CreditHolder, record: Any) -> Balance:
        """What this node knows of ``holder``'s balance, as sent to Redis
        (``holder.credits`` must be set: synced first)."""
        assert holder.credits is not None, "a holder with credits"
        debt = self._debt.get(holder.key)
        owed = debt[1] if debt is not None and debt[0] == holder.credits_version else 0
        return Balance(
            holder.key,
            holder.credits_version,
            holder.credits,
            holder.credits_refilled_at,
            _refill_amount(record),
            owed,
        )

    async def _remote(
        self,
        items: Sequence[tuple[str, Limit]],
        balances: Sequence[tuple[CreditHolder, Any]],
        now: float,
        cost: int,
    ) -> tuple[Verdict | None, list[int]]:
        """The decision in Redis, mirrored into the actors; None when Redis
        is unreachable or does not answer in time (then marked so). Also
        the indexes of ``balances`` sent (those with a balance)."""
        sent: list[int] = []  # indexes of ``balances`` with a balance to spend
        wire: list[Balance] = []
        for index, (holder, record) in enumerate(balances):
            holder.sync_credits(record, now)
            if holder.credits is None:
                continue
            sent.append(index)
            wire.append(self.balance_of(holder, record))
        if not self.link.reachable:
            return None, sent
        keys, args = decide_call(
            self.namespace, items, wire, None if self.redis_clock else now, cost
        )
        reply: Any = None
        try:
            # No answer in time (TimeoutError): a frozen or overloaded Redis,
            # fall back until a ping answers.
            reply = await self.batcher.call_with(
                DECIDE,
                keys,
                args,
                self._late_undo(items, wire, cost),
                self.config.command_timeout_seconds,
            )
        except REDIS_ERRORS as exc:
            self.failed(exc)
        if reply is None:
            return None, sent
        verdict = parse_decide(reply, self.namespace, items, cost, keys)
        for index, sent_as, after in zip(sent, wire, verdict.balances, strict=True):
            self.mirror(balances[index][0], sent_as, after)
        return verdict, sent

    def mirror(self, holder: CreditHolder, sent_as: Balance, after: BalanceAfter) -> None:
        """``holder`` shows the balance Redis answered; the debt sent with it
        is paid."""
        holder.credits = after.balance
        holder.credits_version = after.version
        holder.credits_refilled_at = after.refilled_at
        if sent_as.debt:
            debt = self._debt.get(holder.key)
            left = (debt[1] - sent_as.debt) if debt is not None else 0
            if left > 0 and debt is not None:
                self._debt[holder.key] = (debt[0], left)
            else:
                self._debt.pop(holder.key, None)

    def _late_undo(
        self, items: Sequence[tuple[str, Limit]], wire: list[Balance], cost: int
    ) -> Callable[[Any], None]:
        def late(reply: Any) -> None:
            verdict = parse_decide(reply, self.namespace, items, cost)
            if verdict.reservation is None:
                return
            self.late_undos += 1
            refunds = [
                (b.subject, after, cost) for b, after in zip(wire, verdict.balances, strict=True)
            ]
            keys, args = undo_call(self.namespace, verdict.reservation, refunds, None)
            self.batcher.send(UNDO, keys, args)

        return late

    def _fallback(
        self,
        items: Sequence[tuple[str, Limit]],
        balances: Sequence[tuple[CreditHolder, Any]],
        now: float,
        cost: int,
    ) -> Granted:
        self.fallbacks += 1
        if self.config.fallback == "deny":
            exc = LimitsUnavailable(
                "the cluster's Redis is unreachable: limits and credits cannot be decided "
                '([cluster] fallback = "deny")'
            )
            exc.headers["Retry-After"] = "1"
            raise exc
        states: list[tuple[Limit, LimitState]] = []
        for subject, limit in items:
            slot = (subject, limit.state_key or limit.name)
            state = self._local.get(slot)
            if state is None:
                state = self._local[slot] = LimitState()
            states.append((limit, state))
        decisions, reservation = acquire(states, now, cost)
        if reservation is None:
            return decisions, None, None
        for index, (holder, _) in enumerate(balances):
            if holder.credits is not None and holder.credits < cost:
                release(reservation, now)
                return decisions, None, index
        for holder, _ in balances:
            if holder.credits is not None:
                holder.credits -= cost
                version, owed = self._debt.get(holder.key, (holder.credits_version, 0))
                if version != holder.credits_version:
                    owed = 0
                self._debt[holder.key] = (holder.credits_version, owed + cost)
        return decisions, reservation, None

    # ---- giving back ---------------------------------------------------------------

    async def undo(
        self,
        reservation: Reservation | None,
        now: float,
        actor: CreditHolder | None = None,
        amount: int = 0,
    ) -> None:
        """``SharedLimits.undo``'s contract, awaited: give back ``reservation``
        and ``amount`` credits to ``actor``'s balance (not after a reset or
        a refill). A failure is logged: the request then stays counted."""
        await self.undo_many(reservation, now, [(actor, amount)] if actor is not None else [])

    async def undo_many(
        self,
        reservation: Reservation | None,
        now: float,
        refunds: Sequence[tuple[CreditHolder, int]],
    ) -> None:
        """Give back ``reservation`` and ``amount`` to each (actor, amount)."""
        local = reservation is not None and not all(
            isinstance(state, ClusterState) for _, state in reservation.items
        )
        if local or (reservation is None and not self.link.reachable):
            if reservation is not None:
                release(reservation, now)
            for holder, amount in refunds:
                self._refund_locally(holder, amount)
            return
        wire = [
            (
                holder.key,
                BalanceAfter(holder.credits_version, 0, holder.credits_refilled_at),
                amount,
            )
            for holder, amount in refunds
            if amount and holder.credits is not None
        ]
        keys, args = undo_call(self.namespace, reservation, wire, None if self.redis_clock else now)
        try:
            with trio.fail_after(self.config.command_timeout_seconds):
                await self.batcher.call(UNDO, keys, args)
        except REDIS_ERRORS as exc:
            self.failed(exc)
            return
        for holder, amount in refunds:
            if holder.credits is not None:
                holder.credits += amount

    def undo_soon(
        self,
        reservation: Reservation | None,
        now: float,
        refunds: Sequence[tuple[CreditHolder, int]] = (),
    ) -> None:
        """``undo_many`` without waiting (from synchronous code): the give-back
        rides with the next pipeline; the actors' balances move at once."""
        local = reservation is not None and not all(
            isinstance(state, ClusterState) for _, state in reservation.items
        )
        if local or not self.link.reachable:
            if reservation is not None and local:
                release(reservation, now)
            for holder, amount in refunds:
                self._refund_locally(holder, amount)
            return
        wire = [
            (h.key, BalanceAfter(h.credits_version, 0, h.credits_refilled_at), amount)
            for h, amount in refunds
            if amount and h.credits is not None
        ]
        keys, args = undo_call(self.namespace, reservation, wire, None if self.redis_clock else now)
        self.batcher.send(UNDO, keys, args)
        for holder, amount in refunds:
            if holder.credits is not None:
                holder.credits += amount

    def _refund_locally(self, holder: CreditHolder, amount: int) -> None:
        if not amount or holder.credits is None:
            return
        holder.credits += amount
        debt = self._debt.get(holder.key)
        if debt is not None and debt[0] == holder.credits_version:
            left = debt[1] - amount
            if left > 0:
                self._debt[holder.key] = (debt[0], left)
            else:
                del self._debt[holder.key]

    # ---- usage, cluster-wide ---------------------------------------------------------

    def add_usage(
        self,
        subject: str,
        requests: int,
        by_class: Sequence[int],
        taken: int,
        last_used_at: float,
    ) -> None:
        """Add a flush's counters to ``subject``'s cluster-wide usage hash
        (with the next pipeline; dropped while Redis is unreachable: each
        node's LMDB keeps its own exact counts)."""
        keys, args = usage_call(self.namespace, subject, requests, by_class, taken, last_used_at)
        self.batcher.send(USAGE, keys, args)

    async def usage(self, subject: str) -> dict[str, float]:
        """``subject``'s cluster-wide counters (``requests``, ``s1``..``s5``,
        ``taken``, ``last_used_at``); empty when none yet."""
        raw = await self.link.client.hgetall(usage_key(self.namespace, subject))
        return {k.decode(): float(v) for k, v in raw.items()}

    # ---- errors --------------------------------------------------------------------

    def failed(self, exc: BaseException) -> None:
        """A call to Redis failed: the link marks it unreachable (logged at most
        once a minute)."""
        self.link.failed(exc)
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_INTERVAL:
            self._error_logged_at = now
            log.error(
                "a limit decision could not reach the cluster's Redis (%s: %s); fallback %r "
                "until it answers",
                type(exc).__name__,
                exc,
                self.config.fallback,
            )


@asynccontextmanager
async def open_cluster_limits(
    config: ClusterConfig,
    *,
    link: RedisLink | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    redis_clock: bool = True,
    thin: bool = True,
) -> AsyncIterator[ClusterLimits]:
    """The process's ``ClusterLimits`` with its batcher running (and its own
    ``RedisLink`` unless one is given). Decisions go over the batcher's own
    connection (``resp.py``) unless ``thin`` is False or the URL names no
    fixed server (Sentinel): then by coredis."""
    async with _maybe_link(config, link) as own, trio.open_nursery() as nursery:
        target = target_of(own.client) if thin else None
        path = (
            RespPath(target, connect_timeout=config.connect_timeout_seconds)
            if target is not None
            else None
        )
        batcher = Batcher(own, max_items=config.batch_max, thin=path)
        await nursery.start(batcher.run)
        yield ClusterLimits(own, batcher, config, namespace=namespace, redis_clock=redis_clock)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _maybe_link(config: ClusterConfig, link: RedisLink | None) -> AsyncIterator[RedisLink]:
    if link is not None:
        yield link
        return
    async with open_redis(config) as own:
        yield own
