"""Data-plane events: decided in memory on the request path, written to
the outbox in batches.

Theory of operation
-------------------
The limiter tells ``LiveEvents`` what it just decided, synchronously and
cheaply (no I/O, no await, no allocation on the common path):

* ``spent``: a request took ``cost`` credits and left ``after``. The
  ``credits.low`` levels of that credits object (``Credits.low_at_percent``,
  else ``[events] credits_low_percent``, of the *reference*: the refill
  amount when the credits refill, else ``remaining`` as set) are computed
  once per credits object; a spend that leaves more than the highest level
  costs one dict lookup and one comparison. An event fires for every level
  the spend crossed (``before > level >= after``). Every balance is taken
  by one owner at a time (the actor, or with several workers the shared
  table), so exactly one spend crosses a level: one event per crossing,
  and again after a refill or a top-up brings the balance back above it.
* ``rate_limited``: a key's request was refused by its rate limit. At most
  one ``rate_limit.exceeded`` per key per ``MARK_SECONDS``: in memory per
  process, and across workers by a mark in ``EVENT_MARKS`` checked when
  the batch is written.
* ``expired``: a key was refused as expired. The batch marks the stored
  key ``expired`` (as ``POST /maintenance/cleanup`` does) and emits
  ``key.expired`` only if it was still ``active``: once per key, whichever
  worker saw it first, and never again after the cleanup emitted it.

Each is queued in memory (``QUEUE_MAX`` at most: past it new ones are
dropped, counted and logged) and ``run`` writes the queue in one write
transaction per ``BATCH_SECONDS``, and a last time when it stops.

On a cluster node (``gate`` set) a ``rate_limit.exceeded`` is first
claimed in Redis (``cluster.events``), so one node in the cluster writes
it per key and ``MARK_SECONDS``; while Redis is unreachable it waits in the
queue. The other events are once per cluster already (see that module).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any, Final

import msgspec
import trio

from triogate.cluster.events import ClaimsUnavailable, EventClaims
from triogate.config import EventsConfig
from triogate.control.eventsink import key_data
from triogate.control.keyrules import effective_status
from triogate.events.outbox import Outbox
from triogate.events.retention import MARK_SECONDS, mark_time, pack_mark
from triogate.storage import Credits, Store, Table, WriteTxn, codec

__all__ = ["BATCH_SECONDS", "QUEUE_MAX", "LiveEvents", "credit_levels"]

log = logging.getLogger("triogate.events")

BATCH_SECONDS: Final = 0.5
QUEUE_MAX: Final = 10_000
#: Keys remembered per process for the in-memory checks (then cleared).
MEMORY_MAX: Final = 100_000

# (type, data, now, mark subject or None); "key.expired" carries the key id.
_Pending = tuple[str, dict[str, Any], float, str | None]
# The highest level, and (percent, level) highest first.
_Levels = tuple[int, tuple[tuple[int, int], ...]]


def credit_levels(spec: Credits, default_percent: tuple[int, ...]) -> _Levels:
    """The balances at which ``credits.low`` fires for ``spec``."""
    percents = spec.low_at_percent if spec.low_at_percent is not None else default_percent
    reference = spec.refill_amount if spec.refill_amount > 0 else spec.remaining
    levels = sorted({(p, reference * p // 100) for p in percents}, key=lambda x: -x[1])
    top = levels[0][1] if levels else -1
    return top, tuple(levels)


class LiveEvents:
    __slots__ = (
        "_clock",
        "_default",
        "_expired",
        "_levels",
        "_limited_at",
        "_node",
        "_outbox",
        "_pending",
        "_store",
        "dropped",
        "gate",
        "wants_expired",
        "wants_limited",
        "wants_low",
        "written",
    )

    def __init__(
        self, outbox: Outbox, config: EventsConfig, store: Store, clock: Callable[[], float]
    ) -> None:
        self._outbox = outbox
        self._store = store
        self._clock = clock
        self._default = tuple(config.credits_low_percent)
        self.wants_low = outbox.wants("credits.low")
        self.wants_limited = outbox.wants("rate_limit.exceeded")
        self.wants_expired = outbox.wants("key.expired")
        self._levels: dict[Credits, _Levels] = {}
        self._limited_at: dict[str, float] = {}
        self._expired: set[str] = set()
        self._pending: list[_Pending] = []
        self.dropped = 0
        self.written = 0
        #: A cluster node's claims (``cluster.events``); None on a single gateway.
        self.gate: EventClaims | None = None
        self._node = secrets.token_hex(8)  # names this process's claims

    def __repr__(self) -> str:
        return f"<LiveEvents {len(self._pending)} queued, {self.written} written>"

    @property
    def wanted(self) -> bool:
        """Whether any data-plane event has a webhook."""
        return self.wants_low or self.wants_limited or self.wants_expired

    # ---- the request path: synchronous, cheap ------------------------------------

    def _queue(self, item: _Pending) -> None:
        if len(self._pending) >= QUEUE_MAX:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.warning("event queue full: %d data-plane events dropped", self.dropped)
            return
        self._pending.append(item)

    def spent(
        self,
        key_id: str,
        spec: Credits | None,
        after: int | None,
        cost: int,
        identity_id: str | None = None,
    ) -> None:
        """A request of ``key_id`` took ``cost`` credits of ``spec``'s
        balance, leaving ``after`` (the identity's pool when ``identity_id``)."""
        if spec is None or after is None or not self.wants_low:
            return
        levels = self._levels.get(spec)
        if levels is None:
            if len(self._levels) >= MEMORY_MAX:
                self._levels.clear()
            levels = self._levels[spec] = credit_levels(spec, self._default)
        if after > levels[0]:
            return
        before = after + cost
        reference = spec.refill_amount if spec.refill_amount > 0 else spec.remaining
        now = self._clock()
        for percent, level in levels[1]:
            if before > level >= after:
                data: dict[str, Any] = {
                    "key_id": key_id,
                    "identity_id": identity_id,
                    "balance_of": "identity" if identity_id is not None else "key",
                    "remaining": after,
                    "threshold_percent": percent,
                    "threshold": level,
                    "reference": reference,
                }
                self._queue(("credits.low", data, now, None))

    def rate_limited(self, key_id: str) -> None:
        """A request of ``key_id`` was refused by a rate limit."""
        if not self.wants_limited:
            return
        now = self._clock()
        last = self._limited_at.get(key_id)
        if last is not None and now - last < MARK_SECONDS:
            return
        if len(self._limited_at) >= MEMORY_MAX:
            self._limited_at.clear()
        self._limited_at[key_id] = now
        self._queue(("rate_limit.exceeded", {"key_id": key_id}, now, key_id))

    def expired(self, key_id: str) -> None:
        """A request of ``key_id`` was refused: the key has expired."""
        if not self.wants_expired or key_id in self._expired:
            return
        if len(self._expired) >= MEMORY_MAX:
            self._expired.clear()
        self._expired.add(key_id)
        self._queue(("key.expired", {"key_id": key_id}, self._clock(), None))

    # ---- the batch writer -------------------------------------------------------------

    def _write(self, txn: WriteTxn, batch: list[_Pending]) -> int:
        outbox = self._outbox
        written = 0
        for event_type, data, now, mark in batch:
            if event_type == "key.expired":
                key_id = data["key_id"].encode()
                raw = txn.get(Table.KEYS, key_id)
                if raw is None:
                    continue
                record = codec.key.decode(raw)
                if record.status != "active" or effective_status(record, now) != "expired":
                    continue  # emitted already (here or by a cleanup), or extended
                record = msgspec.structs.replace(record, status="expired", updated_at=now)
                txn.put(Table.KEYS, key_id, codec.encode(record))
                data = key_data(record, now)
            elif mark is not None:
                name = event_type.encode() + b"\x00" + mark.encode()
                seen = txn.get(Table.EVENT_MARKS, name)
                if seen is not None and now - mark_time(seen) < MARK_SECONDS:
                    continue  # another worker told it this minute
                txn.put(Table.EVENT_MARKS, name, pack_mark(now))
            outbox.emit(txn, event_type, data, now)
            written += 1
        return written

    async def flush(self) -> int:
        """Write what is queued in one transaction; the events written. On
        failure (a full store) the batch goes back to the queue."""
        batch, self._pending = self._pending, []
        if batch and self.gate is not None:
            batch = await self._claim(self.gate, batch)
        if not batch:
            return 0
        try:
            written = await self._store.write(lambda txn: self._write(txn, batch))
        except Exception:
            log.exception("writing %d data-plane events failed; kept for later", len(batch))
            self._pending = (batch + self._pending)[:QUEUE_MAX]
            raise
        self.written += written
        return written

    async def _claim(self, gate: EventClaims, batch: list[_Pending]) -> list[_Pending]:
        """``batch`` without the marked events another node claimed first;
        those claimed here lose their mark (no local check after the
        cluster's). While Redis is unreachable the marked ones go back to
        the queue."""
        asks = [i for i, item in enumerate(batch) if item[3] is not None]
        if not asks:
            return batch
        claims = [
            (batch[i][0], str(batch[i][3]), MARK_SECONDS, f"{self._node}:{batch[i][2]!r}")
            for i in asks
        ]
        try:
            made = await gate.claim(claims)
        except ClaimsUnavailable:
            held = [batch[i] for i in asks]
            self._pending = (held + self._pending)[:QUEUE_MAX]
            waiting = set(asks)
            return [item for i, item in enumerate(batch) if i not in waiting]
        verdict = dict(zip(asks, made, strict=True))
        out: list[_Pending] = []
        for i, item in enumerate(batch):
            mine = verdict.get(i)
            if mine is None:
                out.append(item)
            elif mine:
                out.append((item[0], item[1], item[2], None))
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the queue every ``BATCH_SECONDS`` until cancelled, then once more."""
        task_status.started()
        try:
            failures = 0
            while True:
                await trio.sleep(BATCH_SECONDS * min(2**failures, 60))
                try:
                    await self.flush()
                    failures = 0
                except Exception:
                    failures += 1
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.flush()
                except Exception:
                    log.exception("the final write of data-plane events failed")
