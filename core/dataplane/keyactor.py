"""The actor of one key: its rate-limit state, credits and usage counters,
and the messages it answers. The registry that spawns, flushes and evicts
actors, and the theory of operation, are in ``actors``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from triogate.errors import GatewayError
from triogate.policy.ratelimit import Decision, Limit, LimitState, Reservation, acquire, release
from triogate.storage import KeyRecord, RateLimit, UsageRecord

if TYPE_CHECKING:
    from triogate.dataplane.actors import ActorRegistry

__all__ = [
    "Admission",
    "Admit",
    "Evict",
    "Flush",
    "Inspect",
    "KeyActor",
    "Message",
    "QuotaExceeded",
    "RateLimited",
    "Record",
]


class RateLimited(GatewayError):
    status = 429
    code = "RATE_LIMITED"
    title = "Too Many Requests"


class QuotaExceeded(GatewayError):
    status = 429
    code = "QUOTA_EXCEEDED"
    title = "Too Many Requests"


# ---- messages ---------------------------------------------------------------


class Admit(msgspec.Struct, tag=True, frozen=True):
    """Admit one request of ``cost`` under ``limits`` (the async path)."""

    limits: tuple[tuple[str, int, float, str], ...]
    cost: int = 1
    credits: bool = True


class Record(msgspec.Struct, tag=True, frozen=True):
    """Count one answered request with its status."""

    status: int


class Flush(msgspec.Struct, tag=True, frozen=True):
    """Write this actor's dirty state now."""


class Evict(msgspec.Struct, tag=True, frozen=True):
    """Flush, then leave the registry."""


class Inspect(msgspec.Struct, tag=True, frozen=True):
    """Answer with a snapshot of the state (tests, admin)."""


Message = Admit | Record | Flush | Evict | Inspect


class Admission(msgspec.Struct, gc=False):
    """The outcome of admitting one request: the decision to report in
    headers (the most restrictive limit), and how to undo it."""

    allowed: bool
    code: str | None
    decisions: list[Decision]
    reservation: Reservation | None
    credits_taken: int
    credits_left: int | None


class KeyActor:
    """The mutable state of one key (or, unpersisted, of one ip/route subject)."""

    __slots__ = (
        "_limits",
        "by_class",
        "credits",
        "credits_refilled_at",
        "credits_version",
        "dirty",
        "flushed_requests",
        "key",
        "last_active",
        "last_used_at",
        "mailbox",
        "persist",
        "policy",
        "policy_source",
        "registry",
        "requests",
        "running",
        "taken",
    )

    def __init__(self, key: str, registry: ActorRegistry, *, persist: bool) -> None:
        self.key = key
        self.registry = registry
        self.persist = persist
        self._limits: dict[str, tuple[Limit, LimitState]] = {}
        # Usage not yet flushed (deltas): flushed as additions to the store.
        self.requests = 0
        self.by_class = [0, 0, 0, 0, 0]
        self.flushed_requests = 0
        self.last_used_at: float | None = None
        # Credits: the balance as this actor knows it, for credits_version.
        self.credits: int | None = None
        self.credits_version = -1
        self.credits_refilled_at: float | None = None
        self.taken = 0  # credits consumed since the last flush
        self.dirty = False
        self.last_active = 0.0
        self.mailbox: deque[tuple[Message, trio.Event | None, list[Any]]] | None = None
        self.running = False
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

    def _limit_state(self, limit: Limit) -> LimitState:
        entry = self._limits.get(limit.key)
        if entry is None or (entry[0] is not limit and entry[0] != limit):
            # New limit, or its policy changed: keep the GCRA state if we had
            # one under this key (loaded from storage), else start fresh.
            state = entry[1] if entry is not None else LimitState()
            self._limits[limit.key] = (limit, state)
            return state
        return entry[1]

    # ---- the hot path (synchronous: atomic under trio) ------------------------

    def key_limits(self, record: KeyRecord, default: RateLimit | None) -> tuple[Limit, ...]:
        """The key's own limits (or the configured default), as ``Limit``s;
        rebuilt only when the record's limits change."""
        source = record.rate_limits or default
        if source != self.policy_source:
            specs = record.rate_limits or ((default,) if default is not None else ())
            self.policy = tuple(
                Limit(r.name, r.limit, r.period_seconds, r.algorithm) for r in specs
            )
            self.policy_source = source
        return self.policy

    def _sync_credits(self, record: KeyRecord | None, now: float) -> None:
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
        if spec.refill_interval_seconds > 0 and spec.refill_amount > 0:
            since = self.credits_refilled_at if self.credits_refilled_at is not None else now
            periods = math.floor((now - since) / spec.refill_interval_seconds + 1e-9)
            if periods > 0:
                # A refill tops the balance up to refill_amount (as Unkey
                # does): unused credits do not pile up without bound.
                self.credits = max(self.credits or 0, spec.refill_amount)
                self.credits_refilled_at = since + periods * spec.refill_interval_seconds
                self._touch()

    def admit_nowait(
        self,
        limits: Sequence[Limit],
        now: float,
        *,
        cost: int = 1,
        record: KeyRecord | None = None,
        use_credits: bool = False,
    ) -> Admission:
        """Decide every limit and the credits together, all-or-nothing."""
        self.last_active = now
        if use_credits:
            self._sync_credits(record, now)
        states = self._limits
        if self.registry.workers > 1:
            limits = [self.registry.share(limit) for limit in limits]
        items = []
        for limit in limits:
            entry = states.get(limit.state_key or limit.name)
            items.append(
                (limit, entry[1])
                if entry is not None and entry[0] is limit
                else (limit, self._limit_state(limit))
            )
        decisions, reservation = acquire(items, now, cost)
        if reservation is None:
            return Admission(False, "RATE_LIMITED", decisions, None, 0, self.credits)
        taken = 0
        if use_credits and self.credits is not None:
            if self.credits < cost:
                release(reservation, now)
                return Admission(False, "QUOTA_EXCEEDED", decisions, None, 0, self.credits)
            self.credits -= cost
            self.taken += cost
            taken = cost
        self._touch()
        return Admission(True, None, decisions, reservation, taken, self.credits)

    def undo_nowait(self, admission: Admission, now: float) -> None:
        """The request was refused after admission: it consumes nothing."""
        if admission.reservation is not None:
            release(admission.reservation, now)
        if admission.credits_taken and self.credits is not None:
            self.credits += admission.credits_taken
            self.taken -= admission.credits_taken
        self._touch()  # the refund must reach storage even after a flush

    def record_nowait(self, status: int, now: float) -> None:
        self.requests += 1
        self.last_used_at = now
        self.last_active = now
        index = min(max(status // 100, 1), 5) - 1
        self.by_class[index] += 1
        self._touch()

    def _touch(self) -> None:
        """Mark the state changed: the flusher will write it."""
        if self.persist and not self.dirty:
            self.dirty = True
            self.registry._mark_dirty(self)

    # ---- flushing --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "unflushed_requests": self.requests,
            "requests": self.flushed_requests + self.requests,
            "credits": self.credits,
            "last_used_at": self.last_used_at,
            "limits": {n: st.tat for n, (_, st) in self._limits.items()},
            "dirty": self.dirty,
        }

    def take_delta(self) -> tuple[int, list[int], int, float | None]:
        """Hand over the unflushed counters (they are now the flusher's)."""
        delta = (self.requests, self.by_class, self.taken, self.last_used_at)
        self.flushed_requests += self.requests
        self.requests = 0
        self.by_class = [0, 0, 0, 0, 0]
        self.taken = 0
        self.dirty = False
        return delta

    def restore_delta(self, delta: tuple[int, list[int], int, float | None]) -> None:
        """A flush of ``delta`` failed: take the counters back, to be
        written with the next flush."""
        requests, by_class, taken, _ = delta
        self.requests += requests
        self.flushed_requests -= requests
        self.by_class = [a + b for a, b in zip(self.by_class, by_class, strict=True)]
        self.taken += taken
        self._touch()

    def limiter_state(self) -> dict[str, float]:
        if self.registry.workers > 1:
            return {}  # each worker counts its own share: nothing to share
        return {n: st.tat for n, (lim, st) in self._limits.items() if lim.algorithm == "gcra"}

    # ---- the mailbox -------------------------------------------------------------

    async def _run(self) -> None:
        """Process mail until the mailbox is empty, then end."""
        assert self.mailbox is not None
        try:
            while self.mailbox:
                message, done, reply = self.mailbox.popleft()
                try:
                    reply.append(await self._handle(message))
                except Exception as exc:  # the asker gets it
                    reply.append(exc)
                if done is not None:
                    done.set()
                await trio.lowlevel.checkpoint()
        finally:
            self.running = False

    async def _handle(self, message: Message) -> Any:
        now = self.registry.clock()
        if isinstance(message, Admit):
            limits = [Limit(n, q, w, a) for n, q, w, a in message.limits]  # type: ignore[arg-type]
            return self.admit_nowait(limits, now, cost=message.cost, use_credits=message.credits)
        if isinstance(message, Record):
            self.record_nowait(message.status, now)
            return None
        if isinstance(message, Flush):
            await self.registry.flush([self])
            return None
        if isinstance(message, Evict):
            await self.registry.flush([self])
            self.registry._forget(self)
            return None
        return self.snapshot()
