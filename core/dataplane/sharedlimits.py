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
would. The table is disposable: if a write does not fit, expired entries are
pruned, then the limiter states dropped (a warning: limits start whole); if
LMDB fails otherwise, decisions fall back to this process's own state (an
error in the log: each worker then counts alone) rather than answering 500.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import lmdb
import msgspec

from triogate.dataplane.usageflush import UsageFlush
from triogate.policy.ratelimit import Decision, Limit, LimitState, Reservation, acquire, release
from triogate.storage.limits_file import open_limits_env

if TYPE_CHECKING:
    from triogate.dataplane.keyactor import CreditsSource, KeyActor

__all__ = ["SharedLimits", "SharedState"]

log = logging.getLogger("triogate.dataplane.sharedlimits")

_LIMIT: Final = struct.Struct("<dqqqd")  # tat, window, count, previous, whole_at
_CREDITS: Final = struct.Struct("<qqd")  # version, balance, refilled_at (NaN: None)
#: Entries looked at per ``prune`` call: bounded, so the writer is held briefly.
PRUNE_SCAN: Final = 20_000
ERROR_LOG_INTERVAL: Final = 60.0

Decided = tuple[list[Decision], Reservation | None, bool]


class SharedState(LimitState):
    """A limit's state as read from the table, with where it lives."""

    __slots__ = ("dbkey",)

    def __init__(self, dbkey: bytes) -> None:  # no super().__init__: ``load`` sets them
        self.dbkey = dbkey
        self.tat, self.window, self.count, self.previous = 0.0, -1, 0, 0

    def load(self, raw: bytes | None) -> None:
        if raw is None:
            self.tat, self.window, self.count, self.previous = 0.0, -1, 0, 0
        else:
            self.tat, self.window, self.count, self.previous, _ = _LIMIT.unpack(raw)


def _pack(limit: Limit, state: LimitState) -> bytes:
    # A sliding window is whole two windows on: neither count matters then.
    whole_at = state.tat if limit.algorithm == "gcra" else (state.window + 2) * limit.period
    return _LIMIT.pack(state.tat, state.window, state.count, state.previous, whole_at)


class SharedLimits:
    """The decision table of ``<data_dir>/limits/``, one per worker process."""

    def __init__(self, env: Any, limits_db: Any, credits_db: Any) -> None:
        self._env = env
        self._limits = limits_db
        self._credits = credits_db
        self._prune_from = b""
        self._local: dict[bytes, SharedState] = {}  # the fallback's state
        self._error_logged_at = -math.inf
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
        except lmdb.MapFullError:
            self._make_room(now)
            try:
                return self._decide(items, now, cost, credits, record)
            except lmdb.Error as exc:
                self._failed(exc)
        except lmdb.Error as exc:
            self._failed(exc)
        return self._decide_locally(items, now, cost, credits, record)

    def _decide(
        self,
        items: Sequence[tuple[str, Limit]],
        now: float,
        cost: int,
        actor: KeyActor | None,
        record: CreditsSource | None,
    ) -> Decided:
        limits_db = self._limits
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
                txn.put(state.dbkey, _pack(limit, state), db=limits_db)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return decisions, reservation, True

    def _take(
        self, txn: Any, actor: KeyActor, record: CreditsSource | None, now: float, cost: int
    ) -> bool:
        key = actor.key.encode()
        raw = txn.get(key, db=self._credits)
        if raw is not None:
            version, balance, refilled = _CREDITS.unpack(raw)
            actor.credits, actor.credits_version = balance, version
            actor.credits_refilled_at = None if math.isnan(refilled) else refilled
            if record is not None and record.credits_version < version:
                record = None  # read before a PATCH another worker saw: the table is newer
        # else: the balance the actor loaded from the store (or last knew).
        actor.sync_credits(record, now)
        if actor.credits is None:
            return True
        if actor.credits < cost:
            return False
        actor.credits -= cost
        self._put_credits(txn, key, actor)
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
                    txn.put(state.dbkey, _pack(limit, state), db=limits_db)
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
        dropped = 0
        try:
            with self._env.begin(write=True, db=self._limits) as txn:
                cursor = txn.cursor()
                found = cursor.set_range(self._prune_from) if self._prune_from else cursor.first()
                seen = 0
                while found and seen < scan:
                    seen += 1
                    if _LIMIT.unpack(cursor.value())[4] <= now:
                        dropped += 1
                        cursor.delete()  # moves to the next entry, if any
                        found = bool(cursor.key())  # LMDB keys are never empty
                    else:
                        found = cursor.next()
                self._prune_from = cursor.key() if found else b""
        except lmdb.Error as exc:
            self._failed(exc)
        return dropped

    def _make_room(self, now: float) -> None:
        self._prune_from = b""
        dropped = self.prune(now, scan=1 << 62)
        with self._env.begin() as txn:
            left = txn.stat(self._limits)["entries"]
        log.warning("the shared limiter table was full: dropped %d expired states", dropped)
        if left > dropped:
            # Still mostly live states: forget them all (limits start whole)
            # rather than refuse or fail requests. Balances are kept.
            with self._env.begin(write=True) as txn:
                txn.drop(self._limits, delete=False)
            log.warning(
                "the shared limiter table is still mostly full (%d live states): dropped "
                "every limiter state; rate limits start whole",
                left,
            )

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
