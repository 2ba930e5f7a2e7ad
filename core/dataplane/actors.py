"""Per-key actors: the only code that changes a key's rate-limit state,
credits and usage counters.

Theory of operation
-------------------
Every key that is used gets a ``KeyActor`` (``keyactor``), spawned on first
use and kept in the ``ActorRegistry``. The actor *owns* its key's mutable
state; nothing else writes it, so there are no locks. Credits and limits are
admitted in the actor of the key's *state key*, which a rotation's new key
shares with the old one (``keychain``); usage is counted in the key's own.

The request path asks an actor **synchronously**: ``actor.admit_nowait``
(limits and credits, all-or-nothing), ``actor.undo_nowait`` and
``actor.record_nowait``. They contain no await, so under trio each runs
atomically: the guarantee a mailbox would give, without the 10-26 µs a
message round trip costs (as much as parsing the request; ``benchmarks/actors.py``
measures both). So an actor has no mailbox and no task: "actor" here means
the one owner of a key's state, and 100,000 idle actors cost no tasks.

What needs I/O is the registry's, in tasks of the nursery it owns (their
work is batched across keys, so one task per kind serves every actor, where
a message per actor would cost a task switch each):

* the **flusher** writes every dirty actor's state in one LMDB write
  transaction every ``flush_interval`` (never a commit per request: a durable
  commit costs ~380 µs); what one key's part of it is and how it merges into
  the stored record is ``usageflush``;
* the **sweeper** evicts actors idle for ``idle_timeout``, after a final
  flush, so memory returns.

Persisted per key (``UsageRecord``): request count, last use, counts by
status class, the credit balance (tagged with the credits *version* of the
key record, so a PATCH from any process resets it at once) and the GCRA
state of the key's own limits, so a restart does not hand out a fresh burst.
Usage counters are flushed as *deltas* added to what is stored, so several
processes may count the same key. A key made by a rotation has its balance
and limiter state in its state key's record, and only its counters in its own.

Several actors' limits are decided together, all-or-nothing, by
``ActorRegistry.acquire`` (a key's own limits with its identity's pool);
``ActorRegistry.release`` gives such a reservation back.

With ``server.workers > 1`` every decision (limits and credits) is made in
``sharedlimits``: a table in a separate LMDB environment that all workers
write, one write transaction per decision, so a key's limits and balance
are exact whichever worker a connection lands on. The actors keep their
counters and their persistence; the shared table is only the state a
decision reads and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from triogate.control.history import Retention, add_minutes, run_pruner
from triogate.dataplane.keyactor import ActorSnapshot, Admission, KeyActor, Refusal, SpentHook
from triogate.dataplane.sharedlimits import SharedLimits
from triogate.dataplane.usageflush import merge_usage
from triogate.errors import StorageFull
from triogate.policy.ratelimit import Decision, Limit, Reservation, acquire, release
from triogate.storage import Store, Table, WriteTxn, codec

if TYPE_CHECKING:
    from triogate.cluster.limits import ClusterLimits
    from triogate.cluster.usage_history import ClusterHistory

__all__ = [
    "FLUSH_BATCH",
    "ActorRegistry",
    "ActorSnapshot",
    "ActorStatistics",
    "Admission",
    "KeyActor",
    "Refusal",
]

log = logging.getLogger("triogate.dataplane.actors")

FLUSH_BATCH: Final = 2048


class ActorStatistics(msgspec.Struct, frozen=True):
    """The registry's state (``statistics()``, the actor metrics)."""

    live_actors: int
    dirty: int
    flushes: int
    last_flush_at: float | None
    last_flush_records: int
    evicted: int


class ActorRegistry:
    """Owns every actor, and the nursery its flusher and sweeper run in."""

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
        self._flushes = 0
        self._last_flush_at: float | None = None
        self._last_flush_records = 0
        self._evicted = 0
        self._flush_lock = trio.Lock()
        self.worker = 0
        self.workers = 1
        #: The workers' shared decision table (``server.workers > 1``); None
        #: in one process, where the actors' own state decides.
        self.shared: SharedLimits | None = None
        #: A cluster node's decisions (``[cluster] redis_url``): the plugins
        #: get ``clusterlimiter.ClusterLimiter``; None on a single gateway.
        self.cluster: ClusterLimits | None = None
        #: Told of every spend of credits (``keyactor.SpentHook``; events set it).
        self.on_spent: SpentHook | None = None
        #: Usage history kept this long (``[storage]``); worker 0 prunes it.
        self.retention = Retention()
        #: A cluster node's share of the cluster-wide usage history: each
        #: flush's minutes go there too (``cluster.usage_history``).
        self.cluster_history: ClusterHistory | None = None

    def set_worker(self, index: int, count: int, shared: SharedLimits | None = None) -> None:
        """This process is worker ``index`` of ``count`` (server.workers),
        deciding through ``shared`` (which the registry closes when it stops)."""
        self.worker, self.workers = index, count
        self.shared = shared

    # ---- decisions over several actors ------------------------------------------

    def acquire(
        self, items: Sequence[tuple[KeyActor, Limit]], now: float, cost: int = 1
    ) -> tuple[list[Decision], Reservation | None]:
        """Decide limits belonging to several actors together, all-or-nothing
        (a key's own limits and its identity's pool): every limit is checked,
        and state changes only if all allow. Returns the decisions (the one
        to report first) and the reservation to ``release`` if the request
        is refused later; None when denied. Synchronous: atomic under trio,
        and with several workers one write transaction of the shared table."""
        for actor, _ in items:
            actor.last_active = now
        shared = self.shared
        if shared is not None:
            decisions, reservation, _ = shared.decide(
                [(actor.key, limit) for actor, limit in items], now, cost
            )
        else:
            decisions, reservation = acquire(
                [(limit, actor.limit_state(limit)) for actor, limit in items], now, cost
            )
        if reservation is not None:
            for actor, _ in items:
                actor._touch()  # the GCRA state goes to storage with the next flush
        return decisions, reservation

    def release(self, reservation: Reservation, now: float) -> None:
        """Give back what ``acquire`` took (the request was refused later)."""
        if self.shared is not None:
            self.shared.undo(reservation, now)
        else:
            release(reservation, now)

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<ActorRegistry {s.live_actors} actors, {s.dirty} dirty, {s.flushes} flushes>"

    def statistics(self) -> ActorStatistics:
        return ActorStatistics(
            live_actors=len(self.actors),
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
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._sweeper)
                if self.worker == 0:
                    nursery.start_soon(run_pruner, self.store, lambda: self.retention, self.clock)
                if self.cluster_history is not None:  # what waited for Redis, once it answers
                    nursery.start_soon(self.cluster_history.run)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.flush(list(self._dirty.values()))
                except Exception:
                    log.exception("the final flush failed")
                if self.shared is not None:
                    self.shared.close()

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
                if self.shared is not None and self.worker == 0:
                    # Entries whose limit is whole again are worth nothing:
                    # one worker drops them, in bounded batches, and keeps
                    # the map from filling (``SharedLimits.sweep``).
                    self.shared.sweep(self.clock())
            except Exception:
                log.exception("evicting idle actors failed; will try again")

    async def evict_idle(self) -> int:
        """Flush and forget every actor unused for ``idle_timeout``; the
        number evicted."""
        cutoff = self.clock() - self.idle_timeout
        idle = [a for a in self.actors.values() if a.last_active <= cutoff]
        if not idle:
            return 0
        await self.flush([a for a in idle if a.dirty])
        evicted = 0
        for actor in idle:
            # Used again while the flush was written: it stays.
            if actor.last_active <= cutoff and not actor.dirty:
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

    def live_balance(self, key: str) -> tuple[int, int] | None:
        """The credit balance a live actor holds for ``key``, with its
        credits version: what the admin views show (the last flush lags a
        flush interval). With several workers, the shared table's (exact);
        None if it has none, or several workers run without one."""
        if self.shared is not None and self.cluster is None:
            return self.shared.balance(key)
        if self.workers > 1 and self.cluster is None:
            return None
        actor = self.actors.get(key)
        if actor is None or not actor.persist or actor.credits is None:
            return None
        return actor.credits, actor.credits_version

    def subject(self, key: str) -> KeyActor:
        """An unpersisted actor for a non-key subject (an address, a route)."""
        actor = self.actors.get(key)
        if actor is None:
            actor = KeyActor(key, self, persist=False)
            actor.last_active = self.clock()
            self.actors[key] = actor
        return actor

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
            flushes = [actor.take_flush() for actor in actors]
            for actor in actors:
                self._dirty.pop(actor.key, None)
            shared = self.shared if self.cluster is None else None
            if shared is not None:
                # The shared table's balance is the exact one: stored as is.
                flushes = shared.exact_flushes(flushes)

            def write(txn: WriteTxn, history: bool = True) -> list[int | None]:
                balances: list[int | None] = []
                for flush in flushes:
                    raw = txn.get(Table.USAGE, flush.key)
                    old = None if raw is None else codec.usage.decode(raw)
                    record, balance = merge_usage(old, flush)
                    txn.put(Table.USAGE, flush.key, codec.encode(record))
                    if history and flush.delta.minutes:
                        add_minutes(txn, flush.key, flush.delta.minutes)
                    balances.append(balance)
                return balances

            history = True
            try:
                try:
                    balances = await self.store.write(write)
                except StorageFull:
                    # The counters and balances first: the usage history
                    # (new buckets, more pages) waits in memory for room.
                    history = False
                    balances = await self.store.write(partial(write, history=False))
            except Exception as exc:
                if not isinstance(exc, StorageFull):  # the store logs that one itself
                    log.exception("flushing %d actors failed; keeping their counts", len(flushes))
                for actor, flush in zip(actors, flushes, strict=True):
                    actor.restore_delta(flush.delta)
                raise
            if not history:
                for actor, flush in zip(actors, flushes, strict=True):
                    if flush.delta.minutes:
                        actor.history.restore(flush.delta.minutes)
                        actor._touch()
            cluster = self.cluster
            for actor, stored in zip(actors, balances, strict=True):
                if stored is not None and shared is None and cluster is None:
                    actor.learn_balance(stored)
            if cluster is not None:  # the cluster-wide usage (Redis's balance is exact)
                for flush in flushes:
                    delta = flush.delta
                    if delta.requests or delta.credits_taken:
                        cluster.add_usage(
                            flush.key.decode(),
                            delta.requests,
                            delta.by_class,
                            delta.credits_taken,
                            delta.last_used_at or 0.0,
                        )
            if self.cluster_history is not None and history:
                await self.cluster_history.push(
                    [(f.key, f.delta.minutes) for f in flushes if f.delta.minutes]
                )
            self._flushes += 1
            self._last_flush_at = self.clock()
            self._last_flush_records = len(flushes)
