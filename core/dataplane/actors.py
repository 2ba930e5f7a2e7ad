"""Per-key actors: the only code that changes a key's rate-limit state,
credits and usage counters.

Theory of operation
-------------------
Every key that is used gets a ``KeyActor`` (``keyactor``), spawned on first
use and kept in the ``ActorRegistry``. The actor *owns* its key's mutable
state; nothing else writes it, so there are no locks. Credits and limits are
admitted in the actor of the key's *state key*, which a rotation's new key
shares with the old one (``keychain``); usage is counted in the key's own.

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
processes may count the same key. A key made by a rotation has its balance
and limiter state in its state key's record, and only its counters in its own.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import trio

from triogate.dataplane.keyactor import (
    Admission,
    Admit,
    Evict,
    Flush,
    Inspect,
    KeyActor,
    Message,
    QuotaExceeded,
    RateLimited,
    Record,
)
from triogate.policy.ratelimit import Limit
from triogate.storage import Store, Table, UsageRecord, WriteTxn, codec
from triogate.storage.base import StoreFull

__all__ = [
    "FLUSH_BATCH",
    "MAILBOX_SIZE",
    "ActorRegistry",
    "ActorStatistics",
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

log = logging.getLogger("triogate.dataplane.actors")

MAILBOX_SIZE: Final = 64
FLUSH_BATCH: Final = 2048


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

    def live_balance(self, key: str) -> tuple[int, int] | None:
        """The credit balance a live actor holds for ``key``, with its
        credits version: what the admin views show (the last flush lags a
        flush interval). None with several workers, where each one knows only
        its own spending and the stored balance is the better answer."""
        if self.workers > 1:
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
            except Exception as exc:
                if not isinstance(exc, StoreFull):  # the store logs that one itself
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
