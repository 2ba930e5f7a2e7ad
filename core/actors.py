"""Per-key actors: the only code that changes a key's rate-limit state,
credits and usage counters.

Theory of operation
-------------------
Every key that is used gets a ``KeyActor``, spawned on first use and kept in
the ``ActorRegistry``. The actor *owns* its key's mutable state; nothing else
writes it, so there are no locks.

Two ways in, both owned by the actor:

* the **hot path** calls ``actor.admit_nowait`` / ``actor.record_nowait``
  directly. They are synchronous and contain no await, so under trio they run
  atomically: the same guarantee a mailbox gives, without the 10-26 µs a
  channel round trip costs (as much as parsing the request; see
  ``benchmarks/actors.py`` for both measured);
* everything else is a **message**: a tagged ``msgspec.Struct`` (``Admit``,
  ``Record``, ``Flush``, ``Evict``, ``Inspect``) sent to the actor's mailbox
  with ``registry.send`` / ``registry.ask``. An actor's task runs while it
  has mail and ends when the mailbox is empty, so 100,000 idle actors cost
  no tasks (a task and a channel per key cost ~4 KB; see docs).

The registry's own tasks, in the nursery it owns:

* the **flusher** writes every dirty actor's state in one LMDB write
  transaction every ``flush_interval`` (never a commit per request: a durable
  commit costs ~380 µs);
* the **sweeper** evicts actors idle for ``idle_timeout``, after a final
  flush, so memory returns.

Persisted per key (``UsageRecord``): request count, last use, counts by
status class, the credit balance (tagged with the credits *version* of the
key record, so a PATCH from any process resets it at once) and the GCRA
state of the key's own limits, so a restart does not hand out a fresh burst.
Usage counters are flushed as *deltas* added to what is stored, so several
processes may count the same key.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import trio

from triogate.errors import GatewayError
from triogate.ratelimit import Decision, Limit, LimitState, Reservation, acquire, release
from triogate.storage import KeyRecord, RateLimit, Store, Table, UsageRecord, WriteTxn, codec

__all__ = [
    "ActorRegistry",
    "ActorStatistics",
    "Admission",
    "KeyActor",
    "QuotaExceeded",
    "RateLimited",
]

log = logging.getLogger("triogate.actors")

MAILBOX_SIZE: Final = 64
FLUSH_BATCH: Final = 2048


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


class ActorStatistics(msgspec.Struct, frozen=True):
    live_actors: int
    running_actors: int
    queued_messages: int
    dirty: int
    flushes: int
    last_flush_at: float | None
    last_flush_records: int
    evicted: int


class ActorRegistry:
    """Owns every actor and the nursery they (and the flusher) run in."""

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 1.0,
        idle_timeout: float = 300.0,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.actors: dict[str, KeyActor] = {}
        self._dirty: dict[str, KeyActor] = {}
        self._nursery: trio.Nursery | None = None
        self._flushes = 0
        self._last_flush_at: float | None = None
        self._last_flush_records = 0
        self._evicted = 0
        self._flush_lock = trio.Lock()
        self.worker = 0
        self.workers = 1
        self._shares: dict[Limit, Limit] = {}

    def set_worker(self, index: int, count: int) -> None:
        """This process is worker ``index`` of ``count`` (server.workers)."""
        self.worker, self.workers = index, count
        self._shares.clear()

    def share(self, limit: Limit) -> Limit:
        """This worker's share of a limit: ``limit // workers``, the
        remainder going to the first workers, at least 1. Shares add up to
        the limit, so N workers together never admit more than the limit
        (or N per period, for a limit below N)."""
        if self.workers == 1:
            return limit
        shared = self._shares.get(limit)
        if shared is None:
            base, extra = divmod(limit.limit, self.workers)
            count = max(1, base + (1 if self.worker < extra else 0))
            shared = msgspec.structs.replace(limit, limit=count)
            self._shares[limit] = shared
        return shared

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<ActorRegistry {s.live_actors} actors, {s.dirty} dirty, "
            f"{s.queued_messages} queued, {s.flushes} flushes>"
        )

    def statistics(self) -> ActorStatistics:
        return ActorStatistics(
            live_actors=len(self.actors),
            running_actors=sum(1 for a in self.actors.values() if a.running),
            queued_messages=sum(len(a.mailbox or ()) for a in self.actors.values()),
            dirty=len(self._dirty),
            flushes=self._flushes,
            last_flush_at=self._last_flush_at,
            last_flush_records=self._last_flush_records,
            evicted=self._evicted,
        )

    # ---- lifetime ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the flusher and the sweeper until cancelled; a final flush on
        the way out (clean shutdown flushes everything)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._sweeper)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                try:
                    await self.flush(list(self._dirty.values()))
                except Exception:
                    log.exception("the final flush failed")

    async def _flusher(self) -> None:
        failures = 0
        while True:
            # After a failed flush (disk full, say), back off: the counts
            # are kept and retried, and the gateway goes on serving.
            await trio.sleep(self.flush_interval * min(2**failures, 60))
            if self._dirty:
                try:
                    await self.flush(list(self._dirty.values()))
                    failures = 0
                except Exception:
                    failures += 1

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(min(self.idle_timeout, max(self.flush_interval, 1.0)))
            try:
                await self.evict_idle()
            except Exception:
                log.exception("evicting idle actors failed; will try again")

    async def evict_idle(self) -> int:
        cutoff = self.clock() - self.idle_timeout
        idle = [a for a in self.actors.values() if a.last_active <= cutoff and not a.running]
        if not idle:
            return 0
        await self.flush([a for a in idle if a.dirty])
        evicted = 0
        for actor in idle:
            if actor.last_active <= cutoff and not actor.dirty and not actor.running:
                self._forget(actor)
                evicted += 1
        return evicted

    def _forget(self, actor: KeyActor) -> None:
        if self.actors.get(actor.key) is actor:
            del self.actors[actor.key]
            self._evicted += 1

    def _mark_dirty(self, actor: KeyActor) -> None:
        self._dirty[actor.key] = actor

    # ---- actors -----------------------------------------------------------------

    def actor(self, key: str) -> KeyActor:
        """The actor of an API key, spawned (and its stored state loaded) on
        first use."""
        actor = self.actors.get(key)
        if actor is None:
            actor = KeyActor(key, self, persist=True)
            with self.store.read() as txn:
                raw = txn.get(Table.USAGE, key.encode())
            actor.load(None if raw is None else codec.usage.decode(raw))
            actor.last_active = self.clock()
            self.actors[key] = actor
        return actor

    def subject(self, key: str) -> KeyActor:
        """An unpersisted actor for a non-key subject (an address, a route)."""
        actor = self.actors.get(key)
        if actor is None:
            actor = KeyActor(key, self, persist=False)
            actor.last_active = self.clock()
            self.actors[key] = actor
        return actor

    def send_nowait(
        self, key: str, message: Message, *, done: trio.Event | None = None
    ) -> list[Any]:
        """Post a message; the actor's task is started if it is not running.
        Raises trio.WouldBlock when the mailbox is full (push back)."""
        if self._nursery is None:
            raise RuntimeError("the actor registry is not running")
        actor = self.actor(key)
        if actor.mailbox is None:
            actor.mailbox = deque()
        if len(actor.mailbox) >= MAILBOX_SIZE:
            raise trio.WouldBlock
        reply: list[Any] = []
        actor.mailbox.append((message, done, reply))
        if not actor.running:
            actor.running = True
            self._nursery.start_soon(actor._run)
        return reply

    async def send(self, key: str, message: Message) -> None:
        while True:
            try:
                self.send_nowait(key, message)
                break
            except trio.WouldBlock:
                await trio.sleep(0.001)  # a full mailbox pushes back on the sender
        await trio.lowlevel.checkpoint()

    async def ask(self, key: str, message: Message) -> Any:
        """Send and wait for the actor's answer (one round trip)."""
        done = trio.Event()
        while True:
            try:
                reply = self.send_nowait(key, message, done=done)
                break
            except trio.WouldBlock:
                await trio.sleep(0.001)
        await done.wait()
        result = reply[0]
        if isinstance(result, Exception):
            raise result
        return result

    # ---- persistence --------------------------------------------------------------

    async def flush(self, actors: Sequence[KeyActor]) -> None:
        """Write these actors' deltas and state: one write transaction per
        batch of at most ``FLUSH_BATCH`` actors (bounded, so a flush of
        100,000 keys does not hold LMDB's writer, or its memory, at once)."""
        actors = [a for a in actors if a.persist and a.dirty]
        for start in range(0, len(actors), FLUSH_BATCH):
            await self._flush_batch(actors[start : start + FLUSH_BATCH])

    async def _flush_batch(self, actors: Sequence[KeyActor]) -> None:
        if not actors:
            return
        async with self._flush_lock:
            batch = []
            deltas = []
            for actor in actors:
                delta = actor.take_delta()
                deltas.append(delta)
                requests, by_class, taken, last_used = delta
                batch.append(
                    (
                        actor.key.encode(),
                        requests,
                        by_class,
                        taken,
                        last_used,
                        actor.credits,
                        actor.credits_version,
                        actor.credits_refilled_at,
                        actor.limiter_state(),
                    )
                )
                self._dirty.pop(actor.key, None)

            def write(txn: WriteTxn) -> dict[bytes, int | None]:
                balances: dict[bytes, int | None] = {}
                for (
                    key,
                    requests,
                    by_class,
                    taken,
                    last_used,
                    credits,
                    version,
                    refilled,
                    lim,
                ) in batch:
                    raw = txn.get(Table.USAGE, key)
                    old = UsageRecord() if raw is None else codec.usage.decode(raw)
                    remaining = credits
                    if (
                        credits is not None
                        and old.credits_remaining is not None
                        and old.credits_version == version
                        and old.credits_refilled_at == refilled  # a refill resets the count
                    ):
                        # Another process may have spent some too: what is
                        # stored, less what we spent since our last flush.
                        remaining = max(0, min(credits + taken, old.credits_remaining) - taken)
                    stale = credits is not None and old.credits_version > version
                    if stale or credits is None:
                        # Storage has a newer credits version (a PATCH seen by
                        # another process first): keep its balance, add only
                        # the counters.
                        remaining = old.credits_remaining
                        refilled = old.credits_refilled_at
                        version = old.credits_version
                    balances[key] = None if stale else remaining
                    classes = tuple(o + d for o, d in zip(old.by_class, by_class, strict=True))
                    new = UsageRecord(
                        requests=old.requests + requests,
                        last_used_at=max(
                            (t for t in (old.last_used_at, last_used) if t is not None),
                            default=None,
                        ),
                        by_class=classes,  # type: ignore[arg-type]
                        credits_remaining=remaining,
                        credits_refilled_at=refilled,
                        credits_version=version,
                        limiters=lim or old.limiters,
                    )
                    txn.put(Table.USAGE, key, codec.encode(new))
                return balances

            try:
                balances = await self.store.write(write)
            except Exception:
                log.exception("flushing %d actors failed; keeping their counts", len(batch))
                for actor, delta in zip(actors, deltas, strict=True):
                    actor.restore_delta(delta)
                raise
            for actor in actors:
                stored = balances.get(actor.key.encode())
                if stored is not None and actor.credits is not None:
                    # Pick up what other processes spent (less what this
                    # actor took while the write was in flight).
                    actor.credits = max(0, min(actor.credits, stored - actor.taken))
            self._flushes += 1
            self._last_flush_at = self.clock()
            self._last_flush_records = len(batch)
