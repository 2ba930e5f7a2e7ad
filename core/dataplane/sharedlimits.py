"""Rate-limit and credit decisions shared by every worker of one host.

With ``server.workers > 1`` each worker is a process of its own, so the
actors' in-process state would count each worker's requests apart. Instead
every decision is made here, in one write transaction of a separate LMDB
environment (``triogate.storage.limits_file``: ``<data_dir>/limits/``, no
fsync): read the states of the limits (and the balance) it needs, decide
with the sans-IO code (``policy.ratelimit.acquire``: the same GCRA and
sliding window as one process), write the new states, commit. LMDB
serialises writers across processes (a robust mutex: a writer killed
mid-transaction is rolled back, not left holding the lock), so a decision is
atomic across workers and a key's limit, its identity's pool and its credits
are exact whichever worker a connection lands on. ``benchmarks/sharedlimits.py``
measures a decision.

Two tables:

``limits``
    ``subject \\x00 limit key`` -> ``tat, window, count, previous, whole_at``
    (``LimitState`` and when the limit is whole again, after which the entry
    says nothing and ``prune`` drops it).
``credits``
    ``subject`` -> ``credits version, balance, refilled at``: the one balance
    every worker spends from. It is also written to the store with each
    flush (``UsageFlush.exact``), for the views and for the next start.

A balance the table does not have yet (first use, or the environment was
recreated) starts from what the actor loaded from the store, as one process
would. The table is disposable: worker 0's sweeper drops expired entries,
and keeps the map below ``ROOM_AT`` of its pages (expired states first, then
every limiter state: a warning, limits start whole). If a write does not fit
anyway, expired states are dropped at once, then, if it still does not fit,
every limiter state; if LMDB fails otherwise (or making room did not help:
not tried again for ``NO_ROOM_BACKOFF`` seconds), decisions, credit
operations and peeks fall back to this process's own state (an error in the
log: each worker then counts alone) rather than answering 500.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import lmdb
import msgspec

from triogate.dataplane.sharedtable import (
    NO_ROOM_BACKOFF,
    PRUNE_SCAN,
    ROOM_AT,
    SharedState,
    change_locally,
    drop_states,
    pack_state,
    peek_locally,
    prune_batch,
    restore_credits,
    saved_credits,
)
from triogate.dataplane.usageflush import UsageFlush
from triogate.policy.creditversion import older_credits
from triogate.policy.ratelimit import (
    Decision,
    Limit,
    LimitState,
    Reservation,
    acquire,
    decide,
    release,
)
from triogate.storage.limits_file import open_limits_env, used_share

if TYPE_CHECKING:
    from triogate.dataplane.keyactor import CreditsSource, KeyActor

__all__ = ["SharedLimits", "SharedState"]

log = logging.getLogger("triogate.dataplane.sharedlimits")

_CREDITS: Final = struct.Struct("<qqd")  # version, balance, refilled_at (NaN: None)
ERROR_LOG_INTERVAL: Final = 60.0

Decided = tuple[list[Decision], Reservation | None, bool]
_T = TypeVar("_T")


class SharedLimits:
    """The decision table of ``<data_dir>/limits/``, one per worker process."""

    def __init__(self, env: Any, limits_db: Any, credits_db: Any) -> None:
        self._env = env
        self._limits = limits_db
        self._credits = credits_db
        self._prune_from = b""
        self._local: dict[bytes, SharedState] = {}  # the fallback's state
        self._error_logged_at = -math.inf
        self._no_room_until = -math.inf
        self.errors = 0

    @classmethod
    def open(cls, data_dir: Path) -> SharedLimits:
        env, (limits_db, credits_db) = open_limits_env(data_dir, (b"limits", b"credits"))
        return cls(env, limits_db, credits_db)

    def __repr__(self) -> str:
        return f"<SharedLimits {self._env.path()}>"

    def close(self) -> None:
        self._env.close()

    # ---- deciding ------------------------------------------------------------------

    def decide(
        self,
        items: Sequence[tuple[str, Limit]],
        now: float,
        cost: int = 1,
        *,
        credits: KeyActor | None = None,
        record: CreditsSource | None = None,
    ) -> Decided:
        """Decide the limits of ``items`` (subject, limit) together and, if
        they allow, take ``cost`` from ``credits``' balance: all-or-nothing,
        one transaction. Returns the decisions, the reservation (None when
        refused) and whether the credits sufficed (False: refused for them)."""
        try:
            return self._decide(items, now, cost, credits, record)
        except lmdb.Error as exc:
            return self._recover(
                exc,
                lambda: self._decide(items, now, cost, credits, record),
                lambda: self._decide_locally(items, now, cost, credits, record),
                now,
            )

    def _recover(
        self, exc: lmdb.Error, again: Callable[[], _T], fallback: Callable[[], _T], now: float
    ) -> _T:
        """After ``exc``: a full map is made room in and the call tried
        ``again`` (unless making room failed a moment ago: a full prune per
        request would hold every worker's writer); else, or if that fails
        too, ``fallback`` (this process's own state): never an exception
        for a request."""
        if isinstance(exc, lmdb.MapFullError) and time.monotonic() >= self._no_room_until:
            try:
                try:
                    self._prune_expired(now)
                    return again()
                except lmdb.MapFullError:
                    # Still full (live states), or too full even to delete in
                    # (a deletion copies its pages): forget the limiter
                    # states, whose pages a drop frees at once.
                    self._drop_states()
                return again()
            except lmdb.Error as failed:  # making room needs free pages too
                self._no_room_until = time.monotonic() + NO_ROOM_BACKOFF
                exc = failed
        self._failed(exc)
        return fallback()

    def _decide(
        self,
        items: Sequence[tuple[str, Limit]],
        now: float,
        cost: int,
        actor: KeyActor | None,
        record: CreditsSource | None,
    ) -> Decided:
        limits_db = self._limits
        saved = None if actor is None else saved_credits(actor)
        txn = self._env.begin(write=True)
        try:
            states: list[tuple[Limit, SharedState]] = []
            for subject, limit in items:
                state = SharedState(f"{subject}\x00{limit.state_key or limit.name}".encode())
                state.load(txn.get(state.dbkey, db=limits_db))
                states.append((limit, state))
            decisions, reservation = acquire(states, now, cost)
            if reservation is None:
                txn.abort()
                return decisions, None, True
            if actor is not None and not self._take(txn, actor, record, now, cost):
                txn.abort()
                return decisions, None, False
            for limit, state in states:
                txn.put(state.dbkey, pack_state(limit, state), db=limits_db)
            txn.commit()
        except BaseException:
            txn.abort()
            if actor is not None and saved is not None:
                restore_credits(actor, saved)  # the aborted transaction took nothing
            raise
        return decisions, reservation, True

    def _take(
        self, txn: Any, actor: KeyActor, record: CreditsSource | None, now: float, cost: int
    ) -> bool:
        # Without an entry: the balance the actor loaded from the store (or last knew).
        self._load_credits(txn, actor, record, now)
        if actor.credits is None:
            return True
        if actor.credits < cost:
            return False
        actor.credits -= cost
        self._put_credits(txn, actor.key.encode(), actor)
        return True

    def _put_credits(self, txn: Any, key: bytes, actor: KeyActor) -> None:
        refilled = actor.credits_refilled_at
        value = _CREDITS.pack(
            actor.credits_version, actor.credits, math.nan if refilled is None else refilled
        )
        txn.put(key, value, db=self._credits)

    def undo(
        self,
        reservation: Reservation | None,
        now: float,
        actor: KeyActor | None = None,
        amount: int = 0,
    ) -> None:
        """Give back what a decision took: its reservation and ``amount``
        credits to ``actor``'s balance (unless the balance was reset or
        refilled since, which a refund must not raise)."""
        try:
            self._undo(reservation, now, actor, amount)
        except lmdb.Error as exc:
            self._failed(exc)
            if reservation is not None:
                release(reservation, now)

    def _undo(
        self, reservation: Reservation | None, now: float, actor: KeyActor | None, amount: int
    ) -> None:
        limits_db = self._limits
        txn = self._env.begin(write=True)
        try:
            if reservation is not None:
                for _, state in reservation.items:
                    assert isinstance(state, SharedState)
                    state.load(txn.get(state.dbkey, db=limits_db))
                release(reservation, now)
                for limit, state in reservation.items:
                    assert isinstance(state, SharedState)
                    txn.put(state.dbkey, pack_state(limit, state), db=limits_db)
            if actor is not None and amount:
                key = actor.key.encode()
                raw = txn.get(key, db=self._credits)
                if raw is not None:
                    version, balance, refilled = _CREDITS.unpack(raw)
                    known = actor.credits_refilled_at
                    same_refill = (math.isnan(refilled) and known is None) or refilled == known
                    if version == actor.credits_version and same_refill:
                        actor.credits = balance + amount
                        self._put_credits(txn, key, actor)
            txn.commit()
        except BaseException:
            txn.abort()
            raise

    # ---- credit operations and peeking (``dataplane.creditops``) ---------------------

    def change_credits(
        self,
        actor: KeyActor,
        record: CreditsSource | None,
        now: float,
        change: Callable[[int], int],
    ) -> tuple[int, int] | None:
        """Set ``actor``'s balance to ``change(balance)`` in one transaction
        (atomic against every worker's spending): the old and new balance,
        None when it has no credits. ``change`` raising leaves it as it was."""
        try:
            return self._change_credits(actor, record, now, change)
        except lmdb.Error as exc:
            return self._recover(
                exc,
                lambda: self._change_credits(actor, record, now, change),
                lambda: change_locally(actor, record, now, change),
                now,
            )

    def _change_credits(
        self,
        actor: KeyActor,
        record: CreditsSource | None,
        now: float,
        change: Callable[[int], int],
    ) -> tuple[int, int] | None:
        saved = saved_credits(actor)
        txn = self._env.begin(write=True)
        try:
            self._load_credits(txn, actor, record, now)
            old = actor.credits
            if old is None:
                txn.abort()
                return None
            actor.credits = change(old)
            self._put_credits(txn, actor.key.encode(), actor)
            txn.commit()
        except BaseException:
            txn.abort()
            restore_credits(actor, saved)
            raise
        return old, actor.credits

    def peek(
        self,
        items: Sequence[tuple[str, Limit]],
        credits: Sequence[tuple[KeyActor, CreditsSource | None]],
        now: float,
    ) -> list[Decision]:
        """What a request would meet now, changing nothing: each limit's
        decision for a cost of 0 (``remaining`` is what is left), and the
        balances of ``credits`` loaded into their actors."""
        try:
            return self._peek(items, credits, now)
        except lmdb.Error as exc:
            return self._recover(
                exc,
                lambda: self._peek(items, credits, now),
                lambda: peek_locally(self._local, items, credits, now),
                now,
            )

    def _peek(
        self,
        items: Sequence[tuple[str, Limit]],
        credits: Sequence[tuple[KeyActor, CreditsSource | None]],
        now: float,
    ) -> list[Decision]:
        with self._env.begin() as txn:
            decisions = []
            for subject, limit in items:
                state = SharedState(f"{subject}\x00{limit.state_key or limit.name}".encode())
                state.load(txn.get(state.dbkey, db=self._limits))
                decisions.append(decide(limit, state, now, 0))
            for actor, record in credits:
                self._load_credits(txn, actor, record, now)
        return decisions

    def _load_credits(
        self, txn: Any, actor: KeyActor, record: CreditsSource | None, now: float
    ) -> None:
        raw = txn.get(actor.key.encode(), db=self._credits)
        if raw is not None:
            version, balance, refilled = _CREDITS.unpack(raw)
            actor.credits, actor.credits_version = balance, version
            actor.credits_refilled_at = None if math.isnan(refilled) else refilled
            if record is not None and older_credits(record.credits_version, version):
                # Read before a PATCH another worker saw: the table is newer.
                # (Versions order only within one source: the key's own
                # credits, a plan's, an identity's; another source resets.)
                record = None
        actor.sync_credits(record, now)

    # ---- reading -------------------------------------------------------------------

    def balance(self, key: str) -> tuple[int, int] | None:
        """The exact balance of ``key`` and its credits version, if the
        table has one."""
        try:
            with self._env.begin() as txn:
                raw = txn.get(key.encode(), db=self._credits)
        except lmdb.Error as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        version, balance, _ = _CREDITS.unpack(raw)
        return balance, version

    def exact_flushes(self, flushes: Sequence[UsageFlush]) -> list[UsageFlush]:
        """``flushes`` with the table's balances: what the store should hold."""
        out = list(flushes)
        try:
            with self._env.begin() as txn:
                for i, flush in enumerate(flushes):
                    raw = txn.get(flush.key, db=self._credits)
                    if raw is None or flush.credits is None:
                        continue
                    version, balance, refilled = _CREDITS.unpack(raw)
                    out[i] = msgspec.structs.replace(
                        flush,
                        credits=balance,
                        credits_version=version,
                        credits_refilled_at=None if math.isnan(refilled) else refilled,
                        exact=True,
                    )
        except lmdb.Error as exc:
            self._failed(exc)
            return list(flushes)
        return out

    # ---- keeping it small ------------------------------------------------------------

    def prune(self, now: float, *, scan: int = PRUNE_SCAN) -> int:
        """Drop limiter states that are whole again (they say nothing a
        missing entry would not), looking at ``scan`` entries from where the
        last call stopped; the number dropped."""
        try:
            return self._prune(now, scan)
        except lmdb.Error as exc:
            self._failed(exc)
            return 0

    def sweep(self, now: float) -> int:
        """The sweeper's round (worker 0): ``prune``, then, past ``ROOM_AT``
        of the map's pages, make room (so a request rarely meets a full
        map, and deleting still finds free pages); the states dropped."""
        try:
            dropped = self._prune(now, PRUNE_SCAN)
            if self.used() >= ROOM_AT:
                dropped += self._prune_expired(now)
                # Dropping limiter states helps only if the balances leave room.
                credits = used_share(self._env, (self._credits,))
                if self.used() >= ROOM_AT and credits < ROOM_AT:
                    dropped += self._drop_states()
        except lmdb.Error as exc:
            self._failed(exc)
            return 0
        return dropped

    def used(self) -> float:
        """The share of the map's pages the tables use."""
        return used_share(self._env, (self._limits, self._credits))

    def _prune(self, now: float, scan: int) -> int:
        # Batch by batch (``sharedroom.prune_batch``): only committed
        # deletions count, and the next call goes on from the last one.
        dropped = seen = 0
        while seen < scan:
            deleted, looked, self._prune_from = prune_batch(
                self._env, self._limits, self._prune_from, now, scan - seen
            )
            dropped += deleted
            seen += looked
            if not self._prune_from:
                break
        return dropped

    def _prune_expired(self, now: float) -> int:
        self._prune_from = b""
        dropped = self._prune(now, 1 << 62)
        log.warning("the shared limiter table was nearly full: dropped %d expired states", dropped)
        return dropped

    def _drop_states(self) -> int:
        # Still mostly live states: forget them all (limits start whole;
        # balances are kept) rather than refuse or fail requests.
        left = drop_states(self._env, self._limits)
        log.warning(
            "the shared limiter table is still nearly full (%d live states): dropped "
            "every limiter state; rate limits start whole",
            left,
        )
        return left

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_INTERVAL:
            self._error_logged_at = now
            log.error(
                "the shared limiter table failed (%s); until it works again each worker "
                "decides alone (limits and credits are then per worker)",
                exc,
            )

    def _decide_locally(
        self,
        items: Sequence[tuple[str, Limit]],
        now: float,
        cost: int,
        actor: KeyActor | None,
        record: CreditsSource | None,
    ) -> Decided:
        states: list[tuple[Limit, LimitState]] = []
        for subject, limit in items:
            dbkey = f"{subject}\x00{limit.state_key or limit.name}".encode()
            state = self._local.get(dbkey)
            if state is None:
                state = self._local[dbkey] = SharedState(dbkey)
            states.append((limit, state))
        decisions, reservation = acquire(states, now, cost)
        if reservation is None:
            return decisions, None, True
        if actor is not None:
            actor.sync_credits(record, now)
            if actor.credits is not None:
                if actor.credits < cost:
                    release(reservation, now)
                    return decisions, None, False
                actor.credits -= cost
        return decisions, reservation, True
