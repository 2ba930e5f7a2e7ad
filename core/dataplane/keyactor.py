"""The actor of one key: its rate-limit state, credits and usage counters.
The registry that spawns, flushes and evicts actors, and the theory of
operation, are in ``actors``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from triogate.dataplane.admission import ActorSnapshot, Admission, Refusal
from triogate.dataplane.history import MinuteCounts
from triogate.dataplane.usageflush import UsageDelta, UsageFlush
from triogate.policy.ratelimit import (
    Limit,
    LimitState,
    acquire,
    limit_from,
    release,
)
from triogate.policy.refill import next_refill, refills_due
from triogate.storage import Credits, KeyRecord, UsageRecord

if TYPE_CHECKING:
    from triogate.dataplane.actors import ActorRegistry

__all__ = ["ActorSnapshot", "Admission", "CreditsSource", "KeyActor", "Refusal", "SpentHook"]

#: ``ActorRegistry.on_spent(key_id, credits, left, cost, identity_id)``:
#: called synchronously after a spend of ``cost`` from a balance of
#: ``credits`` that left ``left`` (``identity_id``: the identity's pool)
#: off the request path: ``POST /keys/validate`` with ``spend``, and credit
#: operations that lower a balance (the data plane tells ``events.live``
#: itself). Must not block (events queue and batch).
SpentHook = Callable[[str, Credits | None, int, int, str | None], None]


class CreditsSource(Protocol):
    """Where an actor's credits are set: a ``KeyRecord`` or an
    ``IdentityRecord`` (both carry these fields)."""

    @property
    def credits(self) -> Credits | None: ...

    @property
    def credits_version(self) -> int: ...

    @property
    def credits_set_at(self) -> float | None: ...

    @property
    def updated_at(self) -> float: ...


class KeyActor:
    """The mutable state of one key (or, unpersisted, of one ip/route subject)."""

    __slots__ = (
        "_limits",
        "class1",
        "class2",
        "class3",
        "class4",
        "class5",
        "credits",
        "credits_refilled_at",
        "credits_version",
        "dirty",
        "flushed_requests",
        "history",
        "key",
        "last_active",
        "last_used_at",
        "persist",
        "policy",
        "policy_source",
        "refill_next",
        "registry",
        "requests",
        "taken",
    )

    def __init__(self, key: str, registry: ActorRegistry, *, persist: bool) -> None:
        self.key = key
        self.registry = registry
        self.persist = persist
        self._limits: dict[str, tuple[Limit, LimitState]] = {}
        # Usage not yet flushed (deltas): flushed as additions to the store.
        self.requests = 0
        # ... by status class (1xx .. 5xx): five ints, not a list (this class
        # is compiled: they are unboxed in the object; a list is 96 bytes more
        # for each of 100,000 live actors).
        self.class1 = self.class2 = self.class3 = self.class4 = self.class5 = 0
        self.flushed_requests = 0
        self.last_used_at: float | None = None
        # Unflushed usage history: counts per minute (``history``).
        self.history = MinuteCounts()
        # Credits: the balance as this actor knows it, for credits_version.
        self.credits: int | None = None
        self.credits_version = -1
        self.credits_refilled_at: float | None = None
        # (spec, last refill, next refill instant): ``sync_credits``'s cache.
        self.refill_next: tuple[Credits, float, float] | None = None
        self.taken = 0  # credits consumed since the last flush
        self.dirty = False
        self.last_active = 0.0
        self.policy: tuple[Limit, ...] = ()
        self.policy_source: object = None

    def __repr__(self) -> str:
        return (
            f"<KeyActor {self.key} {self.requests} unflushed requests, credits={self.credits}"
            f"{', dirty' if self.dirty else ''}>"
        )

    # ---- state loading ------------------------------------------------------

    def load(self, usage: UsageRecord | None) -> None:
        if usage is None:
            return
        self.last_used_at = usage.last_used_at
        self.flushed_requests = usage.requests
        self.credits_version = usage.credits_version if usage.credits_remaining is not None else -1
        self.credits = usage.credits_remaining
        self.credits_refilled_at = usage.credits_refilled_at
        for name, tat in usage.limiters.items():
            self._limits[name] = (Limit(name, 1, 1.0), LimitState(tat))

    def limit_state(self, limit: Limit) -> LimitState:
        """This actor's state for ``limit`` (in this process)."""
        entry = self._limits.get(limit.key)
        if entry is None or (entry[0] is not limit and entry[0] != limit):
            # New limit, or its policy changed: keep the GCRA state if we had
            # one under this key (loaded from storage), else start fresh.
            state = entry[1] if entry is not None else LimitState()
            self._limits[limit.key] = (limit, state)
            return state
        return entry[1]

    # ---- the hot path (synchronous: atomic under trio) ------------------------

    def key_limits(self, record: KeyRecord, default: Limit | None) -> tuple[Limit, ...]:
        """The key's own limits (or the configured default), as ``Limit``s;
        rebuilt only when the record's limits change."""
        source = record.rate_limits or default
        if source != self.policy_source:
            if record.rate_limits:
                self.policy = tuple(limit_from(r, r.name) for r in record.rate_limits)
            else:
                self.policy = (default,) if default is not None else ()
            self.policy_source = source
        return self.policy

    def sync_credits(self, record: CreditsSource | None, now: float) -> None:
        """Bring the balance up to date with ``record``'s credits: a new
        credits version resets it, a refill period past tops it up."""
        if record is None:
            return  # no fresher word on the credits: keep the known balance
        if record.credits is None:
            self.credits = None
            return
        if self.credits_version != record.credits_version:
            self.credits = record.credits.remaining
            self.credits_version = record.credits_version
            # Refills count from when the credits were set, not first use.
            self.credits_refilled_at = (
                record.credits_set_at if record.credits_set_at is not None else record.updated_at
            )
            self.taken = 0
        spec = record.credits
        if spec.refill_amount > 0 and (spec.refill_interval_seconds > 0 or spec.refill_interval):
            since = self.credits_refilled_at if self.credits_refilled_at is not None else now
            # The next refill instant, computed once per (spec, last refill):
            # a calendar's costs a datetime or two, not worth paying per request.
            due = self.refill_next
            if due is None or due[0] is not spec or due[1] != since:
                due = self.refill_next = (spec, since, next_refill(spec, since))
            if now >= due[2]:
                periods, refilled_at = refills_due(spec, since, now)
                if periods > 0:
                    # A refill tops the balance up to refill_amount (as Unkey
                    # does): unused credits do not pile up without bound.
                    self.credits = max(self.credits or 0, spec.refill_amount)
                    self.credits_refilled_at = refilled_at
                    self._touch()

    def admit_nowait(
        self,
        limits: Sequence[Limit],
        now: float,
        *,
        cost: int = 1,
        record: CreditsSource | None = None,
        use_credits: bool = False,
    ) -> Admission:
        """Decide every limit and the credits together, all-or-nothing.
        With several workers the decision is the shared table's
        (``ActorRegistry.shared``), exact across processes."""
        self.last_active = now
        shared = self.registry.shared
        if shared is not None:
            return self._admit_shared(limits, now, cost, record, use_credits)
        if use_credits:
            self.sync_credits(record, now)
        states = self._limits
        items = []
        for limit in limits:
            entry = states.get(limit.state_key or limit.name)
            items.append(
                (limit, entry[1])
                if entry is not None and entry[0] is limit
                else (limit, self.limit_state(limit))
            )
        decisions, reservation = acquire(items, now, cost)
        if reservation is None:
            return Admission(False, Refusal.RATE_LIMITED, decisions, None, 0, self.credits)
        taken = 0
        if use_credits and self.credits is not None:
            if self.credits < cost:
                release(reservation, now)
                return Admission(False, Refusal.QUOTA_EXCEEDED, decisions, None, 0, self.credits)
            self.credits -= cost
            self.taken += cost
            taken = cost
        self._touch()
        return Admission(True, None, decisions, reservation, taken, self.credits)

    def _admit_shared(
        self,
        limits: Sequence[Limit],
        now: float,
        cost: int,
        record: CreditsSource | None,
        use_credits: bool,
    ) -> Admission:
        shared = self.registry.shared
        assert shared is not None
        items = [(self.key, limit) for limit in limits]
        decisions, reservation, credits_ok = shared.decide(
            items, now, cost, credits=self if use_credits else None, record=record
        )
        if not credits_ok:
            # Refused for want of credits (the limits would have allowed it).
            return Admission(False, Refusal.QUOTA_EXCEEDED, decisions, None, 0, self.credits)
        if reservation is None:
            return Admission(False, Refusal.RATE_LIMITED, decisions, None, 0, self.credits)
        taken = cost if use_credits and self.credits is not None else 0
        self.taken += taken
        self._touch()
        return Admission(True, None, decisions, reservation, taken, self.credits)

    def undo_nowait(self, admission: Admission, now: float) -> None:
        """The request was refused after admission: it consumes nothing."""
        shared = self.registry.shared
        if shared is not None:
            shared.undo(
                admission.reservation,
                now,
                self if admission.credits_taken else None,
                admission.credits_taken,
            )
            self.taken -= admission.credits_taken
            self._touch()
            return
        if admission.reservation is not None:
            release(admission.reservation, now)
        if admission.credits_taken and self.credits is not None:
            self.credits += admission.credits_taken
            self.taken -= admission.credits_taken
        self._touch()  # the refund must reach storage even after a flush

    def record_nowait(self, status: int, now: float, outcome: int = 0) -> None:
        """Count an answered request (``outcome``: ``history.outcome_of``)."""
        self.requests += 1
        self.last_used_at = now
        self.last_active = now
        # The status class 0..4 (``history.status_class``), without two calls.
        index = status // 100 - 1
        if index < 0:
            index = 0
        elif index > 4:
            index = 4
        if index == 1:
            self.class2 += 1
        elif index == 0:
            self.class1 += 1
        elif index == 2:
            self.class3 += 1
        elif index == 3:
            self.class4 += 1
        else:
            self.class5 += 1
        self.history.count(now, outcome, index)
        if not self.dirty:  # ``_touch`` without a call once marked
            self._touch()

    @property
    def by_class(self) -> tuple[int, int, int, int, int]:
        """The unflushed requests by status class, 1xx to 5xx."""
        return (self.class1, self.class2, self.class3, self.class4, self.class5)

    def _touch(self) -> None:
        """Mark the state changed: the flusher will write it."""
        if self.persist and not self.dirty:
            self.dirty = True
            self.registry._mark_dirty(self)

    # ---- a view, and flushing (the registry calls these) -------------------------

    def snapshot(self) -> ActorSnapshot:
        return ActorSnapshot(
            key=self.key,
            unflushed_requests=self.requests,
            requests=self.flushed_requests + self.requests,
            credits=self.credits,
            last_used_at=self.last_used_at,
            limits={n: st.tat for n, (_, st) in self._limits.items()},
            dirty=self.dirty,
        )

    def take_flush(self) -> UsageFlush:
        """Hand the unflushed counters (they are now the flusher's) and the
        state to write to a flush; the actor is clean until the next change."""
        delta = UsageDelta(
            self.requests,
            self.by_class,
            self.taken,
            self.last_used_at,
            self.history.take(),
        )
        self.flushed_requests += self.requests
        self.requests = 0
        self.class1 = self.class2 = self.class3 = self.class4 = self.class5 = 0
        self.taken = 0
        self.dirty = False
        return UsageFlush(
            self.key.encode(),
            delta,
            self.credits,
            self.credits_version,
            self.credits_refilled_at,
            self._limiter_state(),
        )

    def restore_delta(self, delta: UsageDelta) -> None:
        """A flush of ``delta`` failed: take the counters back, to be
        written with the next flush."""
        self.requests += delta.requests
        self.flushed_requests -= delta.requests
        c1, c2, c3, c4, c5 = delta.by_class
        self.class1 += c1
        self.class2 += c2
        self.class3 += c3
        self.class4 += c4
        self.class5 += c5
        self.taken += delta.credits_taken
        self.history.restore(delta.minutes)
        self._touch()

    def learn_balance(self, stored: int) -> None:
        """After a flush: the balance storage holds, with what other
        processes spent (less what this actor took while the write was in
        flight)."""
        if self.credits is not None:
            self.credits = max(0, min(self.credits, stored - self.taken))

    def _limiter_state(self) -> dict[str, float]:
        if self.registry.workers > 1:
            return {}  # the workers' shared table holds it (``sharedlimits``)
        return {n: st.tat for n, (lim, st) in self._limits.items() if lim.algorithm == "gcra"}
