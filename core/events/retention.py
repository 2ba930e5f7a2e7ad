"""What the event tables keep, and for how long.

* A delivery that is done (``delivered`` or ``failed``) stays in the log
  for ``[events] retention_days``, then is swept, oldest first (ids are
  time-ordered, so the sweep reads from the start and stops at the first
  young one), in bounded batches: one write never holds the writer long.
  A pending delivery is never swept: it is still the outbox's.
* A ``rate_limit.exceeded`` mark (``EVENT_MARKS``) is worth something for
  ``MARK_SECONDS``; older ones are dropped.
"""

from __future__ import annotations

import struct
from itertools import islice
from typing import Final

from triogate.events.outbox import delivery_decoder
from triogate.storage import Store, Table, WriteTxn

__all__ = ["MARK_SECONDS", "SWEEP_BATCH", "mark_time", "pack_mark", "sweep_expired"]

#: ``rate_limit.exceeded`` at most once per key in this window.
MARK_SECONDS: Final = 60.0
SWEEP_BATCH: Final = 1000
_MARK: Final = struct.Struct(">d")


def pack_mark(at: float) -> bytes:
    return _MARK.pack(at)


def mark_time(raw: bytes) -> float:
    (at,) = _MARK.unpack_from(raw)
    return float(at)


def _sweep(txn: WriteTxn, now: float, retention_days: int) -> int:
    cutoff = now - retention_days * 86400.0
    dropped = 0
    for key, raw in islice(txn.scan(Table.EVENT_DELIVERIES), SWEEP_BATCH):
        record = delivery_decoder.decode(raw)
        if record.created_at >= cutoff:
            break
        if record.status != "pending":
            txn.delete(Table.EVENT_DELIVERIES, key)
            dropped += 1
    marks = islice(txn.scan(Table.EVENT_MARKS), SWEEP_BATCH)
    stale = [key for key, raw in marks if now - mark_time(raw) >= MARK_SECONDS]
    for key in stale:
        txn.delete(Table.EVENT_MARKS, key)
    return dropped


async def sweep_expired(store: Store, now: float, retention_days: int) -> int:
    """Drop done deliveries past retention (one batch) and stale marks;
    the number of deliveries dropped."""
    return await store.write(lambda txn: _sweep(txn, now, retention_days))
