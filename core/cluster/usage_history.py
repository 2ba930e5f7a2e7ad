"""Usage history, cluster-wide: each node adds its flushed buckets to
Redis, and ``GET /keys/{id}/usage/history`` on any node reads the
cluster's sums.

Theory of operation
-------------------
A node's flush (``dataplane.actors``) writes each counted minute into its
own LMDB buckets (``control.history.add_minutes``) and hands the same
minutes to ``ClusterHistory.push``. They are merged into a pending map
(per owner, per minute) and sent to Redis as ``HISTORY`` script runs, one
per ``OWNERS_PER_CALL`` owners, each adding the minute, hour and day
buckets (summed first, as ``add_minutes`` does).

Layout, per owner (a key id or an identity id), under the cluster's hash
tag (one slot, so the script also runs on a Redis Cluster):

* ``{NS}:hist:<owner>``: a hash, field ``<tag><bucket start>`` (``m``,
  ``h`` or ``d`` and the start in minutes since the epoch), value the ten
  counters comma-separated (five outcomes, five status classes);
* ``{NS}:hidx:<owner>``: a sorted set of the same fields scored by the
  minute the bucket leaves its retention (start + span + kept), so each
  run drops what is past it (``ZRANGEBYSCORE``, bounded) and a query never
  sees it. Both keys get a TTL of the longest retention plus a day: an
  owner idle that long is gone from Redis altogether.

Retention is ``[storage] usage_retention_days`` and
``usage_minute_retention_hours``, the single node's (``control.history.Retention``).

Exactly once: a run carries a batch id, and the script first sets
``{NS}:hb:<batch id>`` (``SET NX``, a day's TTL); a batch sent again
(its answer was lost, Redis went away) adds nothing twice. A batch that
failed is kept with its id and sent again, before newer minutes, once
Redis answers; while Redis is unreachable the pending minutes wait in
memory (``MAX_OWNERS`` owners and ``MAX_MINUTES`` owner-minutes at most:
each active owner adds a minute per minute of an outage, so owners alone
do not bound it; beyond either, the new minutes are dropped from the
cluster's sums and counted; the node's LMDB keeps them).

Reading is one ``HMGET`` of the range's bucket fields; ``HistoryUnavailable``
when Redis does not answer, so the service answers from the node's own
buckets, marked ``partial``.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import trio
from coredis.exceptions import NoScriptError, ResponseError

from triogate.cluster.decide import DEFAULT_NAMESPACE
from triogate.cluster.lua import Script
from triogate.cluster.redis import REDIS_ERRORS, RedisLink
from triogate.control.history import GRANULARITIES, HistoryUnavailable, Retention

__all__ = [
    "HISTORY",
    "MAX_MINUTES",
    "MAX_OWNERS",
    "OWNERS_PER_CALL",
    "ClusterHistory",
    "history_call",
    "history_keys",
    "parse_bucket",
]

log = logging.getLogger("triogate.cluster.history")

#: Owners one script run carries (a flush of many keys is several runs).
OWNERS_PER_CALL: Final = 64
#: Owners whose minutes may wait for Redis at most.
MAX_OWNERS: Final = 100_000
#: Owner-minutes (one owner's counters of one minute, ~200 bytes) that may
#: wait for Redis at most: about 100 MB.
MAX_MINUTES: Final = 500_000
#: Buckets past their retention one run drops per owner at most.
PRUNE_PER_RUN: Final = 256
#: A batch id is remembered this long (a resend within it adds nothing).
BATCH_TTL_SECONDS: Final = 86_400
_FIELDS: Final = 10
#: How often what waited for Redis is tried again.
RETRY_SECONDS: Final = 1.0
#: Runs of one batch Redis refuses (answers an error: out of memory, a
#: read-only replica) before it is dropped, so that it cannot hold back
#: every later batch for ever.
BATCH_TRIES: Final = 30

HISTORY: Final = Script(
    "history",
    r"""
-- Usage history buckets, cluster-wide. KEYS[1]: the batch mark; then per
-- owner its hash and its index. ARGV: batch TTL, now (minutes), the owner
-- keys' TTL (seconds), prune bound, owners; per owner the bucket count,
-- then per bucket: field, the minute it expires, ten counters.
-- Answers {1, owners skipped} or {0, 0} (the batch was added already).
-- All or nothing: what could fail (a key of another type) is checked
-- before the first write, as a command failing mid-script would leave the
-- batch half added and marked done.
local owners = tonumber(ARGV[5])
local skip = {}
local skipped = 0
for i = 1, owners do
  local h = redis.call('TYPE', KEYS[2 * i])['ok']
  local x = redis.call('TYPE', KEYS[2 * i + 1])['ok']
  if (h ~= 'hash' and h ~= 'none') or (x ~= 'zset' and x ~= 'none') then
    skip[i] = true
    skipped = skipped + 1
  end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return {0, 0}
end
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local bound = tonumber(ARGV[4])
local a = 6
for i = 1, owners do
  local hash, idx = KEYS[2 * i], KEYS[2 * i + 1]
  local buckets = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, buckets do
    local field, expires = ARGV[a], tonumber(ARGV[a + 1])
    if expires > now and not skip[i] then
      local sums = {}
      local old = redis.call('HGET', hash, field)
      if old then
        local p = 0
        for v in string.gmatch(old, '[^,]+') do
          p = p + 1
          sums[p] = tonumber(v)
        end
      end
      local parts = {}
      for c = 1, 10 do
        parts[c] = string.format('%d', (sums[c] or 0) + tonumber(ARGV[a + 1 + c]))
      end
      redis.call('HSET', hash, field, table.concat(parts, ','))
      redis.call('ZADD', idx, expires, field)
    end
    a = a + 12
  end
  if not skip[i] then
    local past = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', 0, bound)
    if #past > 0 then
      redis.call('HDEL', hash, unpack(past))
      redis.call('ZREM', idx, unpack(past))
    end
    redis.call('EXPIRE', hash, ttl)
    redis.call('EXPIRE', idx, ttl)
  end
end
return {1, skipped}
""",
)


# ---- sans-IO: what a run is sent, what a read answers --------------------------------


def history_keys(ns: str, owner: str) -> tuple[str, str]:
    """The owner's bucket hash and its retention index."""
    return f"{{{ns}}}:hist:{owner}", f"{{{ns}}}:hidx:{owner}"


def _kept_minutes(retention: Retention) -> dict[bytes, int]:
    kept = retention.days * 1440
    return {b"m": min(retention.minute_hours * 60, kept), b"h": kept, b"d": kept}


def _field(tag: bytes, start: int) -> str:
    return f"{tag.decode()}{start}"


def history_call(
    ns: str,
    batch: str,
    owners: Sequence[tuple[str, dict[int, list[int]]]],
    retention: Retention,
    now: float,
) -> tuple[list[str], list[str]]:
    """The keys and arguments of one ``HISTORY`` run: each owner's minutes
    (minute -> ten counters) added to its minute, hour and day buckets."""
    kept = _kept_minutes(retention)
    keys = [f"{{{ns}}}:hb:{batch}"]
    args = [
        str(BATCH_TTL_SECONDS),
        str(math.floor(now / 60)),
        str(retention.days * 86400 + 86400),
        str(PRUNE_PER_RUN),
        str(len(owners)),
    ]
    for owner, minutes in owners:
        keys.extend(history_keys(ns, owner))
        sums: dict[tuple[bytes, int], list[int]] = {}
        for minute, counts in minutes.items():
            for tag, span in GRANULARITIES.values():
                slot = (tag, minute - minute % span)
                acc = sums.get(slot)
                if acc is None:
                    sums[slot] = list(counts)
                else:
                    for i, n in enumerate(counts):
                        acc[i] += n
        args.append(str(len(sums)))
        for (tag, start), counts in sums.items():
            span = GRANULARITIES[_NAMES[tag]][1]
            args += [_field(tag, start), str(start + span + kept[tag]), *map(str, counts)]
    return keys, args


_NAMES: Final = {tag: name for name, (tag, _) in GRANULARITIES.items()}


def parse_bucket(raw: bytes | str | None) -> list[int] | None:
    """A bucket's ten counters as stored (None: no bucket, or not one)."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        return None
    counts += [0] * (_FIELDS - len(counts))
    return counts[:_FIELDS]


def read_fields(granularity: str, first: int, end: int) -> list[tuple[int, str]]:
    """The (bucket start, field) of every bucket of a range [first, end)
    (``first`` aligned on the granularity, as ``control.history.window`` gives it)."""
    tag, span = GRANULARITIES[granularity]
    return [(start, _field(tag, start)) for start in range(first, end, span)]


# ---- the node's sender and reader ---------------------------------------------------


class _Batch:
    __slots__ = ("id", "minutes", "owners", "tries")

    def __init__(self, owners: list[tuple[str, dict[int, list[int]]]]) -> None:
        self.id = secrets.token_hex(12)
        self.owners = owners
        self.minutes = sum(len(m) for _, m in owners)
        self.tries = 0


class ClusterHistory:
    """A node's share of the cluster's usage history (module doc)."""

    def __init__(
        self,
        link: RedisLink,
        retention: Callable[[], Retention],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.link = link
        self.retention = retention
        self.namespace = namespace
        self.clock = clock
        self._pending: dict[str, dict[int, list[int]]] = {}
        self._unsent: list[_Batch] = []
        self._lock = trio.Lock()
        self._loaded = False  # HISTORY loaded into this Redis (again after an outage)
        link.listeners.append(self._on_health)
        self.sent = 0
        self.dropped = 0  # owner-minutes left out of the cluster's sums
        self.failures = 0
        self.refused = 0  # runs Redis answered with an error
        self.skipped = 0  # owners whose keys in Redis are not history keys
        # What waits (pending and unsent), counted as it comes and goes: a
        # sum over the batches per new owner would be quadratic in an outage.
        self._owners_waiting = 0
        self._minutes_waiting = 0

    def __repr__(self) -> str:
        return (
            f"<ClusterHistory {len(self._pending)} owners pending, "
            f"{len(self._unsent)} batches unsent, {self.sent} sent>"
        )

    def _on_health(self, up: bool) -> None:
        if not up:
            self._loaded = False  # Redis may come back without its scripts

    @property
    def waiting(self) -> int:
        """Owners whose minutes have not reached Redis yet (an owner pending
        and in an unsent batch counts twice)."""
        return self._owners_waiting

    @property
    def waiting_minutes(self) -> int:
        """Owner-minutes that have not reached Redis yet."""
        return self._minutes_waiting

    def _drop(self, minutes: int) -> None:
        before = self.dropped
        self.dropped += minutes
        if before == 0 or before // 10_000 != self.dropped // 10_000:
            log.warning(
                "%d minutes of usage history not sent to the cluster (Redis away too long); "
                "each node's own history keeps them",
                self.dropped,
            )

    def add(self, owner: str, minutes: Iterable[tuple[int, Sequence[int]]]) -> None:
        """Merge a flush's minutes of ``owner`` into what waits to be sent."""
        mine = self._pending.get(owner)
        new = mine is None
        if mine is None:
            if self._owners_waiting >= MAX_OWNERS:
                self._drop(sum(1 for _ in minutes))
                return
            mine = {}
        dropped = 0
        for minute, counts in minutes:
            acc = mine.get(minute)
            if acc is None:
                if self._minutes_waiting >= MAX_MINUTES:
                    dropped += 1
                    continue
                mine[minute] = list(counts)
                self._minutes_waiting += 1
            else:
                for i, n in enumerate(counts):
                    acc[i] += n
        if new and mine:
            self._pending[owner] = mine
            self._owners_waiting += 1
        if dropped:
            self._drop(dropped)

    async def push(
        self, flushed: Sequence[tuple[bytes, Sequence[tuple[int, Sequence[int]]]]]
    ) -> None:
        """A flush's minutes (owner id bytes, minutes): merged, then sent
        with whatever waits. Never raises (``ActorRegistry`` awaits it)."""
        for owner, minutes in flushed:
            self.add(owner.decode(), minutes)
        await self.send()

    async def send(self) -> bool:
        """Send what waits, oldest batch first; whether nothing waits now.
        A failure keeps the batch (and its id) for the next call."""
        async with self._lock:
            if not self.link.reachable:
                return not self._pending and not self._unsent
            if self._pending:
                owners = list(self._pending.items())
                self._pending = {}
                for start in range(0, len(owners), OWNERS_PER_CALL):
                    self._unsent.append(_Batch(owners[start : start + OWNERS_PER_CALL]))
            timeout = max(self.link.config.command_timeout_seconds * 4, 1.0)
            while self._unsent:
                batch = self._unsent[0]
                keys, args = history_call(
                    self.namespace, batch.id, batch.owners, self.retention(), self.clock()
                )
                try:
                    with trio.fail_after(timeout):
                        skipped = await self._run(keys, args)
                except ResponseError as exc:
                    # Redis answered: it is reachable (downing the link would
                    # make the limits fall back); this batch waits, a while.
                    self.refused += 1
                    batch.tries += 1
                    if batch.tries < BATCH_TRIES:
                        return False
                    log.warning(
                        "usage history: Redis refused a batch %d times (%s: %s); dropped from "
                        "the cluster's sums, the node's own history keeps it",
                        batch.tries,
                        type(exc).__name__,
                        exc,
                    )
                    self._drop(batch.minutes)
                except REDIS_ERRORS as exc:
                    self.failures += 1
                    self.link.failed(exc)
                    return False
                else:
                    self.sent += 1
                    if skipped:
                        self.skipped += skipped
                        log.warning(
                            "usage history: %d owners' keys in Redis are not history keys "
                            "(another program's?); their minutes were not added",
                            skipped,
                        )
                self._unsent.pop(0)
                self._owners_waiting -= len(batch.owners)
                self._minutes_waiting -= batch.minutes
            return True

    async def run(self) -> None:
        """Send what waited for Redis once it answers again (a flush sends
        too, but a node without traffic has no flush), until cancelled."""
        while True:
            await trio.sleep(RETRY_SECONDS)
            if self.link.reachable and (self._pending or self._unsent):
                await self.send()

    async def _run(self, keys: list[str], args: list[str]) -> int:
        """One ``HISTORY`` run; the owners it skipped."""
        client = self.link.client
        if not self._loaded:
            await client.script_load(HISTORY.source)
            self._loaded = True
        try:
            answer = await client.evalsha(HISTORY.sha, keys, args)
        except NoScriptError:
            await client.script_load(HISTORY.source)
            answer = await client.evalsha(HISTORY.sha, keys, args)
        if isinstance(answer, list) and len(answer) == 2 and isinstance(answer[1], int):
            return answer[1]
        return 0

    async def read(
        self, owner: str, granularity: str, first: int, end: int
    ) -> list[tuple[int, list[int]]]:
        """The cluster's buckets of ``owner`` starting in [first, end)
        (minutes), oldest first; ``HistoryUnavailable`` when Redis does not
        answer."""
        if not self.link.reachable:
            raise HistoryUnavailable("the cluster's Redis is unreachable")
        fields = read_fields(granularity, first, end)
        if not fields:
            return []
        hash_key, _ = history_keys(self.namespace, owner)
        timeout = max(self.link.config.command_timeout_seconds * 4, 1.0)
        try:
            with trio.fail_after(timeout):
                raw = await self.link.client.hmget(hash_key, [f for _, f in fields])
        except REDIS_ERRORS as exc:
            self.link.failed(exc)
            raise HistoryUnavailable(f"{type(exc).__name__}: {exc}") from None
        tag, span = GRANULARITIES[granularity]
        # A bucket past its retention that no write has dropped yet is not shown.
        gone = math.floor(self.clock() / 60) - span - _kept_minutes(self.retention())[tag]
        out = []
        for (start, _), value in zip(fields, raw, strict=True):
            counts = parse_bucket(value)
            if counts is not None and start > gone and any(counts):
                out.append((start, counts))
        return out
