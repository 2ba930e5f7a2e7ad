"""Admitting a request of a key with a plan, an identity or roles: the key's
effective limits and credits and its identity's shared pool, decided
all-or-nothing together; and route-bound limits.

Theory of operation
-------------------
The key's own state is in the actor of its state key, as for any key; the
identity's pool in the actor of the identity's id (persisted in ``USAGE``
under that id, like a key's). One request takes from both or from neither:

* the limits of both actors are decided in one ``ActorRegistry.acquire``
  (one process: the actors' own state; several workers: one transaction of
  the shared table, exact across processes);
* then the credits: one process checks every balance before taking any (no
  await between: atomic under trio); with several workers each balance is
  taken in the shared table, the first in the limits' own transaction, a
  second (the identity's, when the key has credits too) in one of its own,
  and given back at once if it was short, so a refusal by either takes
  nothing from the other.

What was taken is given back by ``Grant.undo`` (``ctx.undo``: the request
was refused later). A limit with ``routes`` applies only on those routes:
``LimitTables`` turns each distinct rate-limit list into ``Limit``s once,
and the list for a route once per route, so a request looks it up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from triogate.policy.ratelimit import Decision, Limit, Reservation, limit_from
from triogate.storage.records import RateLimit

if TYPE_CHECKING:
    from triogate.control.keyresolve import CreditsFrom, KeyAccess
    from triogate.dataplane.actors import ActorRegistry
    from triogate.dataplane.keyactor import KeyActor, SpentHook

__all__ = ["Grant", "LimitTable", "LimitTables", "grant", "lowest_balance", "report_spent"]

#: Distinct rate-limit lists kept; past it the cache starts over.
MAX_TABLES: Final = 65_536


class LimitTable:
    """One rate-limit list as ``Limit``s, and the part of it that applies on
    each route (built on first use per route)."""

    __slots__ = ("_by_route", "_specs", "bound", "every")

    def __init__(self, specs: Sequence[RateLimit]) -> None:
        self._specs = tuple(specs)
        self.every = tuple(limit_from(r, r.name) for r in specs)
        #: Whether any limit is bound to routes (else ``every`` applies everywhere).
        self.bound = any(r.routes for r in specs)
        self._by_route: dict[str, tuple[Limit, ...]] = {}

    def __repr__(self) -> str:
        return f"<LimitTable {[limit.name for limit in self.every]}>"

    def on(self, route: str) -> tuple[Limit, ...]:
        """The limits that apply on ``route``."""
        if not self.bound:
            return self.every
        limits = self._by_route.get(route)
        if limits is None:
            limits = tuple(
                limit
                for limit, spec in zip(self.every, self._specs, strict=True)
                if not spec.routes or route in spec.routes
            )
            # Route names come from the config: a bounded set.
            self._by_route[route] = limits
        return limits


class LimitTables:
    """A ``LimitTable`` per distinct rate-limit list (by value)."""

    __slots__ = ("_tables",)

    def __init__(self) -> None:
        self._tables: dict[tuple[RateLimit, ...], LimitTable] = {}

    def __repr__(self) -> str:
        return f"<LimitTables {len(self._tables)}>"

    def get(self, specs: tuple[RateLimit, ...]) -> LimitTable:
        table = self._tables.get(specs)
        if table is None:
            if len(self._tables) >= MAX_TABLES:
                self._tables.clear()
            table = self._tables[specs] = LimitTable(specs)
        return table


class Grant:
    """The outcome of one admission over several actors: the decisions to
    report, and what to give back if the request is refused later."""

    __slots__ = ("_registry", "decisions", "quota", "reservation", "short", "taken")

    def __init__(
        self,
        registry: ActorRegistry,
        decisions: list[Decision],
        reservation: Reservation | None,
        taken: list[KeyActor],
        short: tuple[KeyActor, CreditsFrom] | None = None,
    ) -> None:
        self._registry = registry
        self.decisions = decisions
        self.reservation = reservation
        #: Actors ``cost`` credits were taken from.
        self.taken = taken
        #: The balance that was short (refused for credits), with its source.
        self.short = short
        self.quota = short is not None

    @property
    def allowed(self) -> bool:
        return self.reservation is not None

    def undo(self, now: float, cost: int) -> None:
        """The request was refused after admission: it consumes nothing."""
        registry = self._registry
        shared = registry.shared
        reservation = self.reservation
        if shared is not None:
            first = self.taken[0] if self.taken else None
            shared.undo(reservation, now, first, cost if first is not None else 0)
            for actor in self.taken[1:]:
                shared.undo(None, now, actor, cost)
            for actor in self.taken:
                actor.taken -= cost
                actor._touch()
            return
        if reservation is not None:
            registry.release(reservation, now)
        for actor in self.taken:
            if actor.credits is not None:
                actor.credits += cost
            actor.taken -= cost
            actor._touch()  # the refund must reach storage even after a flush


def grant(
    registry: ActorRegistry,
    items: Sequence[tuple[KeyActor, Limit]],
    credits: Sequence[tuple[KeyActor, CreditsFrom]],
    now: float,
    cost: int,
) -> Grant:
    """Decide ``items`` (an actor's limit each) and take ``cost`` from every
    balance of ``credits`` (an actor and where its balance syncs from),
    all-or-nothing."""
    if registry.shared is not None:
        return _grant_shared(registry, items, credits, now, cost)
    for actor, source in credits:
        actor.last_active = now
        actor.sync_credits(source, now)
    decisions, reservation = registry.acquire(items, now, cost)
    if reservation is None:
        return Grant(registry, decisions, None, [])
    for actor, source in credits:
        balance = actor.credits
        if balance is not None and balance < cost:
            registry.release(reservation, now)
            return Grant(registry, decisions, None, [], (actor, source))
    taken: list[KeyActor] = []
    for actor, _ in credits:
        if actor.credits is not None:
            actor.credits -= cost
            actor.taken += cost
            actor._touch()
            taken.append(actor)
    return Grant(registry, decisions, reservation, taken)


def _grant_shared(
    registry: ActorRegistry,
    items: Sequence[tuple[KeyActor, Limit]],
    credits: Sequence[tuple[KeyActor, CreditsFrom]],
    now: float,
    cost: int,
) -> Grant:
    shared = registry.shared
    assert shared is not None
    for actor, _ in items:
        actor.last_active = now
    first = credits[0] if credits else None
    decisions, reservation, enough = shared.decide(
        [(actor.key, limit) for actor, limit in items],
        now,
        cost,
        credits=first[0] if first is not None else None,
        record=first[1] if first is not None else None,
    )
    if not enough:
        assert first is not None
        return Grant(registry, decisions, None, [], first)
    if reservation is None:
        return Grant(registry, decisions, None, [])
    taken: list[KeyActor] = []
    if first is not None and first[0].credits is not None:
        taken.append(first[0])
    for actor, source in credits[1:]:
        actor.last_active = now
        _, _, enough = shared.decide([], now, cost, credits=actor, record=source)
        if not enough:
            # Give back what the transactions before took: nothing is kept.
            shared.undo(reservation, now, taken[0] if taken else None, cost if taken else 0)
            for earlier in taken[1:]:
                shared.undo(None, now, earlier, cost)
            return Grant(registry, decisions, None, [], (actor, source))
        if actor.credits is not None:
            taken.append(actor)
    for actor in taken:
        actor.taken += cost
    for actor, _ in items:
        actor._touch()
    for actor in taken:
        actor._touch()
    return Grant(registry, decisions, reservation, taken)


def lowest_balance(credits: Sequence[tuple[KeyActor, CreditsFrom]]) -> int:
    """The fewest credits left among ``credits``' balances (a key's own and
    its identity pool's): how many more requests they allow together."""
    lowest: int | None = None
    for actor, _ in credits:
        balance = actor.credits
        if balance is not None and (lowest is None or balance < lowest):
            lowest = balance
    return 0 if lowest is None else lowest


def report_spent(
    hook: SpentHook,
    access: KeyAccess,
    credits: Sequence[tuple[KeyActor, CreditsFrom]],
    key_actor: KeyActor,
    cost: int,
) -> None:
    """Tell ``hook`` (``ActorRegistry.on_spent``) what each balance of an
    admitted request has left."""
    identity = access.identity
    for actor, source in credits:
        if actor.credits is None:
            continue
        pool = None if actor is key_actor or identity is None else identity.id
        hook(access.id, source.credits, actor.credits, cost, pool)
