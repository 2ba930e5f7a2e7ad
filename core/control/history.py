"""Usage history in storage: the bucket layout, adding a flush's minutes,
reading a range, and pruning what is past its retention.

Theory of operation
-------------------
``Table.USAGE_HISTORY`` holds one ``UsageBucket`` per owner (a key id or an
identity id), granularity and bucket start::

    owner id (utf-8) + b"\\x00" + b"m" | b"h" | b"d" + start (u32 big-endian,
    minutes since the epoch)

so one owner's buckets of one granularity are contiguous and in time order:
a range is one cursor walk, bounded by the bucket count a query may ask
(``MAX_BUCKETS``). Hours and days are UTC and aligned on the epoch (a day
bucket is a UTC calendar day).

A flush (``dataplane.actors``) adds each counted minute to its minute, hour
and day bucket in the write transaction of the usage counters
(``add_minutes``); counters are added, so several workers may write the
same bucket. When the store is full the flush writes the counters alone and
the actors keep the minutes for a later flush. Empty buckets are
never written, and a range answers only the buckets that exist (sparse).

Retention: hour and day buckets are kept ``[storage] usage_retention_days``
(default 90), minute buckets ``usage_minute_retention_hours`` (default 48,
at most the former): a busy key writes 1,440 minute buckets a day against 24
hour buckets, so minutes are what the store's size is made of, and they
serve "what happened in the last day or two" (a query spans at most a day
of minutes); billing reads hours and days. Unkey keeps its per-minute table
far shorter than its hourly and daily ones, Tyk aggregates hourly only.
``prune_step`` finds, in a bounded walk of a read snapshot, the buckets
whose whole span ended before the cutoff, ``prune`` deletes them one bounded
write at a time (none when nothing is due), and ``run_pruner`` runs it in
the background (worker 0).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import Annotated, Final, Literal, Protocol

import msgspec
import trio
import trio.lowlevel
from msgspec import Meta, Struct

from triogate.control.ids import is_valid_id
from triogate.control.timeutil import Clock, system_clock, utc_required
from triogate.errors import NotFound, ValidationError
from triogate.storage import ReadTxn, Store, Table, WriteTxn, codec
from triogate.storage.records import UsageBucket

__all__ = [
    "GRANULARITIES",
    "MAX_BUCKETS",
    "HistoryItem",
    "HistoryQuery",
    "HistoryService",
    "HistoryUnavailable",
    "RemoteHistory",
    "Retention",
    "UsageHistory",
    "add_minutes",
    "bucket_key",
    "prune_step",
    "run_pruner",
]

log = logging.getLogger("triogate.control.history")

Granularity = Literal["minute", "hour", "day"]
#: Granularity -> (key tag, bucket length in minutes).
GRANULARITIES: Final[dict[str, tuple[bytes, int]]] = {
    "minute": (b"m", 1),
    "hour": (b"h", 60),
    "day": (b"d", 1440),
}
#: The most buckets one query may span (400 past it): a day of minutes,
#: 90 days of hours, a year (and a leap day) of days.
MAX_BUCKETS: Final[dict[str, int]] = {"minute": 1440, "hour": 2160, "day": 366}
#: A query without ``from`` spans this many buckets back from ``to``.
DEFAULT_BUCKETS: Final[dict[str, int]] = {"minute": 60, "hour": 24, "day": 30}
_U32 = struct.Struct(">I")
_MAX_MINUTE: Final = 2**32 - 1
_FIELDS: Final = 10
#: Entries one prune transaction looks at (deleted or skipped over).
PRUNE_BATCH: Final = 1000
PRUNE_INTERVAL_SECONDS: Final = 600.0


# ---- layout and writing (the flush) ------------------------------------------------


def bucket_key(owner: bytes, tag: bytes, minute: int) -> bytes:
    return owner + b"\x00" + tag + _U32.pack(min(max(minute, 0), _MAX_MINUTE))


def _counts(raw: bytes | None) -> list[int]:
    if raw is None:
        return [0] * _FIELDS
    # The ten counters this version knows (a later one may append fields).
    return list(msgspec.structs.astuple(codec.usage_bucket.decode(raw)))[:_FIELDS]


def add_minutes(txn: WriteTxn, owner: bytes, minutes: Iterable[tuple[int, Sequence[int]]]) -> None:
    """Add each minute's ten counters to its minute, hour and day bucket
    of ``owner`` (summed per bucket first: a flush spanning minutes of one
    hour writes that hour once)."""
    sums: dict[bytes, list[int]] = {}
    for minute, counts in minutes:
        for tag, span in GRANULARITIES.values():
            key = bucket_key(owner, tag, minute - minute % span)
            acc = sums.get(key)
            if acc is None:
                sums[key] = list(counts)
            else:
                for i, n in enumerate(counts):
                    acc[i] += n
    for key, add in sums.items():
        stored = _counts(txn.get(Table.USAGE_HISTORY, key))
        txn.put(
            Table.USAGE_HISTORY,
            key,
            codec.encode(UsageBucket(*(a + b for a, b in zip(stored, add, strict=True)))),
        )


# ---- reading ------------------------------------------------------------------------


class HistoryQuery(Struct, forbid_unknown_fields=True):
    granularity: Granularity = "hour"
    from_: (
        Annotated[datetime, Meta(tz=True, description="RFC 3339; default: a span before to")] | None
    ) = msgspec.field(default=None, name="from")
    to: (
        Annotated[datetime, Meta(tz=True, description="RFC 3339, exclusive; default: now")] | None
    ) = None


class HistoryItem(Struct):
    start: datetime
    total: int
    allowed: int
    rate_limited: int
    quota_exceeded: int
    invalid: int
    upstream_error: int
    by_status_class: dict[str, int]


class UsageHistory(Struct):
    id: str
    granularity: Granularity
    from_: datetime = msgspec.field(name="from")
    to: datetime = msgspec.field()
    #: Buckets with at least one request, oldest first (empty ones omitted).
    items: list[HistoryItem] = msgspec.field(default_factory=list)
    #: True only on a cluster node that could not read the cluster's sums
    #: (Redis unreachable): the items are this node's own requests.
    partial: bool = False


def _item(minute: int, counts: Sequence[int]) -> HistoryItem:
    return HistoryItem(
        start=utc_required(minute * 60.0),
        total=sum(counts[:5]),
        allowed=counts[0],
        rate_limited=counts[1],
        quota_exceeded=counts[2],
        invalid=counts[3],
        upstream_error=counts[4],
        by_status_class={f"{i + 1}xx": counts[5 + i] for i in range(5)},
    )


def window(query: HistoryQuery, now: float) -> tuple[int, int, float, float]:
    """The first and past-the-last bucket start (in minutes) ``query``
    asks, with its ``from`` and ``to`` as seconds; 400 (naming the field)
    for a reversed range or one longer than ``MAX_BUCKETS``."""
    granularity = query.granularity
    span = GRANULARITIES[granularity][1] * 60
    to = query.to.timestamp() if query.to is not None else now
    if query.from_ is not None:
        start = query.from_.timestamp()
        if start >= to:
            raise ValidationError.single("from", "must be before to")
    else:
        start = (math.ceil(to / span) - DEFAULT_BUCKETS[granularity]) * span
    first = math.floor(max(start, 0.0) / span) * span
    buckets = math.ceil((to - first) / span)
    most = MAX_BUCKETS[granularity]
    if buckets > most:
        raise ValidationError.single(
            "from", f"the range spans {buckets} {granularity} buckets; at most {most}"
        )
    return first // 60, max(math.ceil(to / 60), 0), start, to


def read_range(
    txn: ReadTxn, owner: bytes, granularity: str, first: int, end: int
) -> list[tuple[int, list[int]]]:
    """``owner``'s buckets of ``granularity`` starting in [first, end)
    (minutes since the epoch), oldest first."""
    tag = GRANULARITIES[granularity][0]
    prefix = owner + b"\x00" + tag
    after = bucket_key(owner, tag, first - 1) if first > 0 else None
    out = []
    for key, raw in txn.scan(Table.USAGE_HISTORY, prefix=prefix, after=after):
        if len(key) != len(prefix) + 4:
            continue  # not a bucket key (ids hold no 0 byte, so never another owner's)
        minute = _U32.unpack_from(key, len(prefix))[0]
        if minute >= end:
            break
        if minute >= first:
            out.append((minute, _counts(raw)))
    return out


class HistoryUnavailable(Exception):
    """The cluster's history could not be read (its Redis does not answer)."""


class RemoteHistory(Protocol):
    """Where a cluster node reads the cluster's sums (``cluster.usage_history``)."""

    async def read(
        self, owner: str, granularity: str, first: int, end: int
    ) -> list[tuple[int, list[int]]]:
        """Buckets starting in [first, end) minutes, oldest first; raises
        ``HistoryUnavailable``."""
        ...


class HistoryService:
    """``GET /keys/{id}/usage/history`` and ``/identities/{id}/usage/history``.

    On a cluster node (``cluster`` set) the API's reads (``read_key_history``,
    ``read_identity_history``) answer the cluster's sums, or this node's own
    buckets marked ``partial`` while Redis is unreachable; the synchronous
    ones (the CLI on a data directory) always read the node's own."""

    def __init__(self, store: Store, *, clock: Clock = system_clock) -> None:
        self._store = store
        self._clock = clock
        self.cluster: RemoteHistory | None = None

    def __repr__(self) -> str:
        return "<HistoryService>"

    def key_history(self, key_id: str, query: HistoryQuery) -> UsageHistory:
        return self._history(key_id, "key", Table.KEYS, query)

    def identity_history(self, identity_id: str, query: HistoryQuery) -> UsageHistory:
        return self._history(identity_id, "idn", Table.IDENTITIES, query)

    async def read_key_history(self, key_id: str, query: HistoryQuery) -> UsageHistory:
        return await self._read(key_id, "key", Table.KEYS, query)

    async def read_identity_history(self, identity_id: str, query: HistoryQuery) -> UsageHistory:
        return await self._read(identity_id, "idn", Table.IDENTITIES, query)

    async def _read(
        self, owner: str, prefix: str, table: Table, query: HistoryQuery
    ) -> UsageHistory:
        local = self._history(owner, prefix, table, query)  # 400 and 404 as on one node
        cluster = self.cluster
        if cluster is None:
            return local
        first, end, _, _ = window(query, local.to.timestamp())
        try:
            rows = await cluster.read(owner, query.granularity, first, end)
        except HistoryUnavailable as exc:
            log.warning(
                "usage history of %s: this node's own, the cluster's is not (%s)", owner, exc
            )
            return msgspec.structs.replace(local, partial=True)
        return msgspec.structs.replace(
            local, items=[_item(minute, counts) for minute, counts in rows]
        )

    def _history(self, owner: str, prefix: str, table: Table, query: HistoryQuery) -> UsageHistory:
        what = "key" if prefix == "key" else "identity"
        if not is_valid_id(owner, prefix):
            raise ValidationError.single(
                "id", f"not {'a key' if prefix == 'key' else 'an identity'} id"
            )
        first, end, start, to = window(query, self._clock())
        with self._store.read() as txn:
            if txn.get(table, owner.encode()) is None:
                raise NotFound(f"no {what} {owner}")
            rows = read_range(txn, owner.encode(), query.granularity, first, end)
        return UsageHistory(
            id=owner,
            granularity=query.granularity,
            from_=utc_required(start),
            to=utc_required(to),
            items=[_item(minute, counts) for minute, counts in rows],
        )


# ---- pruning ------------------------------------------------------------------------


class Retention(Struct, frozen=True):
    """How long buckets are kept (``[storage]``)."""

    days: int = 90
    minute_hours: int = 48

    def cutoffs(self, now: float) -> dict[bytes, int]:
        """Per granularity tag: buckets starting before this minute are
        past their retention (their whole span ended before the cutoff)."""
        kept = self.days * 86400
        minutes_kept = min(self.minute_hours * 3600, kept)
        out = {}
        for tag, span in GRANULARITIES.values():
            cutoff = now - (minutes_kept if tag == b"m" else kept)
            out[tag] = math.floor(cutoff / 60) - span + 1
        return out


def prune_step(
    txn: ReadTxn, cutoffs: dict[bytes, int], resume: bytes | None, budget: int = PRUNE_BATCH
) -> tuple[list[bytes], bytes | None]:
    """The buckets past ``cutoffs`` among about ``budget`` entries from
    after ``resume`` (None: the start), and where to go on (None: the whole
    table was walked). Each owner's buckets of a granularity are in time
    order: past its first young one the rest are skipped with one seek."""
    doomed: list[bytes] = []
    after = resume
    looked = 0
    while looked < budget:
        seek = None
        walked = False
        for key, _ in txn.scan(Table.USAGE_HISTORY, after=after):
            walked = True
            looked += 1
            cutoff = cutoffs.get(key[-5:-4]) if len(key) > 6 and key[-6] == 0 else None
            if cutoff is None:
                seek = key  # not a bucket: step over it
                break
            if _U32.unpack_from(key, len(key) - 4)[0] < cutoff:
                doomed.append(key)
                after = key
            else:
                # Young: the rest of this owner's range is younger still.
                seek = key[:-4] + b"\xff\xff\xff\xff"
                break
            if looked >= budget:
                break
        if not walked:
            after = None  # the end of the table
            break
        if seek is not None:
            after = seek
    return doomed, after


def _delete(doomed: list[bytes], txn: WriteTxn) -> None:
    for key in doomed:
        txn.delete(Table.USAGE_HISTORY, key)


async def prune(store: Store, retention: Retention, now: float) -> int:
    """Walk the whole table once, in bounded steps: each looks in a read
    snapshot and deletes what it found in one write (none when nothing is
    due, so an idle gateway writes nothing); the number deleted."""
    cutoffs = retention.cutoffs(now)
    deleted = 0
    resume: bytes | None = None
    for _ in range(10_000_000):  # bound: each step moves on by at least one entry
        with store.read() as txn:
            doomed, resume = prune_step(txn, cutoffs, resume)
        if doomed:
            await store.write(partial(_delete, doomed))
            deleted += len(doomed)
        else:
            await trio.lowlevel.checkpoint()
        if resume is None:
            break
    return deleted


async def run_pruner(
    store: Store,
    retention: Callable[[], Retention],
    clock: Callable[[], float],
    *,
    interval: float = PRUNE_INTERVAL_SECONDS,
) -> None:
    """Prune every ``interval`` seconds until cancelled, at the retention
    ``retention()`` says then (a reload may change it); a failure is logged
    and tried again next time."""
    while True:
        try:
            deleted = await prune(store, retention(), clock())
            if deleted:
                log.info("pruned %d usage history buckets past their retention", deleted)
        except Exception:
            log.exception("pruning the usage history failed; will try again")
        await trio.sleep(interval)
