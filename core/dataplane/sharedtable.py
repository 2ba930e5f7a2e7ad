"""The entries of the workers' shared limiter table (``sharedlimits``), and
keeping the table from filling.

The table lives in a fixed LMDB map (``storage.limits_file``). A limiter
state is worth keeping only until its limit is whole again (``whole_at``),
so entries are dropped in bounded batches, each its own write transaction:
LMDB copies the pages a deletion touches, so one transaction deleting much
of a nearly full map would not fit in it. How full the map is counts the
pages the trees use (pages freed by deletions are reused, so they do not
count); past ``ROOM_AT`` the sweeper makes room before a request meets a
full map.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from triogate.policy.ratelimit import Decision, Limit, LimitState, decide

if TYPE_CHECKING:
    from triogate.dataplane.keyactor import CreditsSource, KeyActor

__all__ = [
    "LIMIT_ENTRY",
    "NO_ROOM_BACKOFF",
    "PRUNE_BATCH",
    "PRUNE_SCAN",
    "ROOM_AT",
    "SharedState",
    "change_locally",
    "drop_states",
    "pack_state",
    "peek_locally",
    "prune_batch",
    "restore_credits",
    "saved_credits",
]

#: A limiter state: tat, window, count, previous, whole_at.
LIMIT_ENTRY: Final = struct.Struct("<dqqqd")
_WHOLE_AT: Final = struct.Struct("<d")
_WHOLE_AT_OFFSET: Final = LIMIT_ENTRY.size - _WHOLE_AT.size
#: Entries looked at per sweep: bounded, so the writer is held briefly.
PRUNE_SCAN: Final = 20_000
#: Deletions per prune transaction.
PRUNE_BATCH: Final = 256
#: The share of the map's pages in use past which the sweeper makes room.
ROOM_AT: Final = 0.7
#: After making room failed, seconds before trying again (not per request).
NO_ROOM_BACKOFF: Final = 60.0


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
            self.tat, self.window, self.count, self.previous, _ = LIMIT_ENTRY.unpack(raw)


def pack_state(limit: Limit, state: LimitState) -> bytes:
    # A sliding window is whole two windows on: neither count matters then.
    whole_at = state.tat if limit.algorithm == "gcra" else (state.window + 2) * limit.period
    return LIMIT_ENTRY.pack(state.tat, state.window, state.count, state.previous, whole_at)


def prune_batch(
    env: Any, limits_db: Any, start: bytes, now: float, scan: int
) -> tuple[int, int, bytes]:
    """In one write transaction, from ``start`` (b"": the first entry), look
    at up to ``scan`` entries and delete up to ``PRUNE_BATCH`` of those whole
    again at ``now``: (deleted, looked at, where to go on; b"" at the end).
    Raises what LMDB raises (then nothing was deleted)."""
    with env.begin(write=True, db=limits_db) as txn:
        cursor = txn.cursor()
        found = cursor.set_range(start) if start else cursor.first()
        deleted = seen = 0
        while found and seen < scan and deleted < PRUNE_BATCH:
            seen += 1
            if _WHOLE_AT.unpack_from(cursor.value(), _WHOLE_AT_OFFSET)[0] <= now:
                deleted += 1
                cursor.delete()  # moves to the next entry, if any
                found = bool(cursor.key())  # LMDB keys are never empty
            else:
                found = cursor.next()
        return deleted, seen, cursor.key() if found else b""


def drop_states(env: Any, limits_db: Any) -> int:
    """Empty the limits table (its pages go back to the free list): the
    number of states dropped."""
    with env.begin(write=True) as txn:
        entries: int = txn.stat(limits_db)["entries"]
        txn.drop(limits_db, delete=False)
    return entries


def change_locally(
    actor: KeyActor, record: CreditsSource | None, now: float, change: Callable[[int], int]
) -> tuple[int, int] | None:
    """A credit operation in this process alone (the table failing), as one
    process does it (``creditops``): merged into storage as a negative
    spend, since the table's exact balance is out of reach."""
    actor.sync_credits(record, now)
    old = actor.credits
    if old is None:
        return None
    new = actor.credits = change(old)
    actor.taken -= new - old
    return old, new


def peek_locally(
    local: dict[bytes, SharedState],
    items: Sequence[tuple[str, Limit]],
    credits: Sequence[tuple[KeyActor, CreditsSource | None]],
    now: float,
) -> list[Decision]:
    """``SharedLimits.peek`` on this process's own state (``local``, the
    fallback's), the table failing."""
    decisions = []
    for subject, limit in items:
        dbkey = f"{subject}\x00{limit.state_key or limit.name}".encode()
        state = local.get(dbkey) or SharedState(dbkey)
        decisions.append(decide(limit, state, now, 0))
    for actor, record in credits:
        actor.sync_credits(record, now)
    return decisions


SavedCredits = tuple[int | None, int, float | None]


def saved_credits(actor: KeyActor) -> SavedCredits:
    """``actor``'s balance, version and last refill: a transaction that
    loads and changes them, then fails, puts them back (``restore_credits``)
    so the fallback does not count from a change that was never made."""
    return actor.credits, actor.credits_version, actor.credits_refilled_at


def restore_credits(actor: KeyActor, saved: SavedCredits) -> None:
    actor.credits, actor.credits_version, actor.credits_refilled_at = saved
