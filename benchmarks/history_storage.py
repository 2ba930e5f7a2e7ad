"""What the usage history costs in LMDB: bytes per key-day for a key with
traffic every minute of a day (the worst case: every minute bucket exists).

Keys with real ids (``key_`` + 26 characters) each get requests in every
minute of one UTC day, with a mix of outcomes and status classes, through
the real path: ``KeyActor.record_nowait`` into the actor's minute counters,
and the registry's flush (``add_minutes``) into a real LMDB store, flushed
once per simulated minute as a running gateway would (it flushes every
second; more often changes nothing on disk, only how many times a bucket is
rewritten). Then LMDB's own page count for the ``usage_history`` table,
divided by the keys.

``python -m benchmarks history [--keys N] [--days D]``.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lmdb
import trio

from triogate.dataplane.actors import ActorRegistry
from triogate.dataplane.history import ALLOWED, RATE_LIMITED, UPSTREAM_ERROR
from triogate.storage import Table, open_lmdb_store

__all__ = ["StorageCost", "main", "measure"]

DAY = 86400
T0 = 1_800_000_000 - 1_800_000_000 % DAY  # a UTC midnight


@dataclass(frozen=True)
class StorageCost:
    keys: int
    days: int
    entries: int
    #: LMDB pages of the table (branch, leaf, overflow) times the page size.
    table_bytes: int
    #: Keys and values alone, without LMDB's page and node overhead.
    payload_bytes: int

    @property
    def per_key_day(self) -> float:
        return self.table_bytes / (self.keys * self.days)

    @property
    def entries_per_key_day(self) -> float:
        return self.entries / (self.keys * self.days)

    def steady_state_per_key(self, retention_days: int = 90, minute_hours: int = 48) -> float:
        """Bytes one busy key holds at the default retention: ``minute_hours``
        of minute buckets, ``retention_days`` of hour and day buckets, at
        the measured bytes per entry."""
        per_entry = self.table_bytes / self.entries
        entries = minute_hours * 60 + retention_days * 24 + retention_days
        return per_entry * entries

    def lines(self) -> list[str]:
        return [
            f"usage history storage: {self.keys} keys, traffic every minute of {self.days} day(s)",
            f"  entries per key-day: {self.entries_per_key_day:.0f} "
            "(1,440 minutes + 24 hours + 1 day)",
            f"  LMDB bytes per key-day: {self.per_key_day:,.0f} "
            f"({self.table_bytes / self.entries:.1f} per entry, "
            f"payload {self.payload_bytes / self.entries:.1f})",
            "  one busy key at the default retention (48 h of minutes, 90 days of hours "
            f"and days): {self.steady_state_per_key():,.0f} bytes",
        ]


def _key_id(i: int) -> str:
    return f"key_01J{i:023d}"


async def measure(
    path: Path, *, keys: int = 100, days: int = 1, minutes: int | None = None
) -> StorageCost:
    """Write ``days`` of per-minute traffic (or only its first ``minutes``)
    for ``keys`` keys into a store at ``path``; what the history table then
    holds."""
    now = float(T0)
    async with open_lmdb_store(path) as store:
        registry = ActorRegistry(store, clock=lambda: now)
        actors = [registry.actor(_key_id(i)) for i in range(keys)]
        for minute in range(days * 1440 if minutes is None else minutes):
            now = T0 + minute * 60.0 + 1
            for n, actor in enumerate(actors):
                # A few requests a minute, of several outcomes and classes.
                actor.record_nowait(200, now, ALLOWED)
                if n % 2:
                    actor.record_nowait(429, now + 1, RATE_LIMITED)
                if n % 3 == 0:
                    actor.record_nowait(502, now + 2, UPSTREAM_ERROR)
            await registry.flush(actors)
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=len(Table) + 4, subdir=True)
    try:
        with env.begin() as txn:
            db = env.open_db(Table.USAGE_HISTORY.value, txn=txn, create=False)
            stat = txn.stat(db)
            payload = sum(len(k) + len(v) for k, v in txn.cursor(db=db))
    finally:
        env.close()
    pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    return StorageCost(keys, days, stat["entries"], pages * stat["psize"], payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks history")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--days", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cost = trio.run(lambda: measure(Path(tmp) / "store", keys=args.keys, days=args.days))
    print("\n".join(cost.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
