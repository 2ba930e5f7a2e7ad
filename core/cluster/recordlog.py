"""The records in Redis: the source of truth, and the stream of changes.

Theory of operation
-------------------
Every key lives under one hash tag (``{triogate}`` by default), so the whole
record set is one slot and the scripts below run unchanged on a Redis
Cluster. The layout:

==========================  =========================================================
``{ns}:cluster``            hash: ``id`` (a fresh id per cluster), ``state``
                            (``seeding`` / ``ready``), ``created_at``, and one
                            ``fp:hmac:<v>`` / ``fp:encryption:<v>`` field per secret
                            version: the secrets' fingerprints (never a secret)
``{ns}:head``               hash: ``seq`` (changes accepted so far) and ``id`` (the
                            last change's stream id)
``{ns}:changes``            stream: one entry per accepted change, fields ``n`` (its
                            sequence number) and ``c`` (``tables.Change``, msgpack);
                            trimmed to about ``stream_length`` entries
``{ns}:rec:<table>``        hash per replicated table: key -> record, as in LMDB
==========================  =========================================================

An admin write is one ``COMMIT`` script: it checks that the cluster is the
one the node joined and that ``head.seq`` is still the sequence number the
node's replica stood at when the write ran (optimistic concurrency over the
whole record set: a write validated this way is serializable), then applies
the mutations to the table hashes, adds the change to the stream and moves
the head, all atomically. A refused one tells the node what ``head.seq`` is,
so it can catch up and run the write again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import coredis
import msgspec

from triogate.cluster.tables import REPLICATED_TABLES, Mutation, encode_change
from triogate.storage import Table

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_STREAM_LENGTH",
    "ClusterInfo",
    "CommitOutcome",
    "Head",
    "RecordLog",
    "StreamEntry",
]

DEFAULT_NAMESPACE: Final = "triogate"
DEFAULT_STREAM_LENGTH: Final = 100_000
#: A cluster left in ``seeding`` this long by a node that died may be
#: seeded again by another one.
SEEDING_TIMEOUT: Final = 60.0
SEED_CHUNK: Final = 500

_COMMIT = """
local cid = redis.call('HGET', KEYS[1], 'id')
if cid ~= ARGV[1] then return {-1, cid or ''} end
if redis.call('HGET', KEYS[1], 'state') ~= 'ready' then return {-2, ''} end
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if seq ~= tonumber(ARGV[2]) then return {0, tostring(seq)} end
local n = tonumber(ARGV[5])
local i = 6
for _ = 1, n do
  local k = KEYS[tonumber(ARGV[i])]
  if ARGV[i + 2] == 'p' then
    redis.call('HSET', k, ARGV[i + 1], ARGV[i + 3])
  else
    redis.call('HDEL', k, ARGV[i + 1])
  end
  i = i + 4
end
seq = seq + 1
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'n', seq, 'c', ARGV[4])
redis.call('HSET', KEYS[2], 'seq', seq, 'id', id)
return {1, id, seq}
"""

# Create the cluster (or take over a seeding abandoned for SEEDING_TIMEOUT):
# ARGV = new id, now, then field/value pairs (the fingerprints). Wipes what a
# lost or abandoned cluster left: its head, stream and record hashes (KEYS[4..]).
_CREATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'ready' then return {0, redis.call('HGET', KEYS[1], 'id')} end
if state == 'seeding' then
  local since = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '0')
  if tonumber(ARGV[2]) - since < tonumber(ARGV[3]) then
    return {0, redis.call('HGET', KEYS[1], 'id')}
  end
end
redis.call('DEL', unpack(KEYS))
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'seeding', 'created_at', ARGV[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {1, ARGV[1]}
"""

_READY = """
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'seq', 0, 'id', '0-0')
redis.call('HSET', KEYS[1], 'state', 'ready')
return 1
"""

# The head and the cluster id in one read (a snapshot starts from it).
_HEAD = """
return {redis.call('HGET', KEYS[1], 'id') or '', redis.call('HGET', KEYS[2], 'seq') or '0',
        redis.call('HGET', KEYS[2], 'id') or '0-0'}
"""


class Head(msgspec.Struct, frozen=True):
    """The cluster as Redis has it now: its id ('' when there is none) and
    the last accepted change."""

    cluster: str
    seq: int
    stream_id: bytes


class ClusterInfo(msgspec.Struct, frozen=True):
    id: str
    state: str
    created_at: float
    fingerprints: dict[str, dict[int, str]]


class CommitOutcome(msgspec.Struct, frozen=True):
    """``accepted``: the change is ``seq`` at ``stream_id``. Otherwise
    ``head_seq`` is where the cluster is (the node catches up and tries
    again), or ``cluster_gone`` says the cluster is not the one joined."""

    accepted: bool
    seq: int = 0
    stream_id: bytes = b""
    head_seq: int = 0
    cluster_gone: bool = False


class StreamEntry(msgspec.Struct, frozen=True):
    stream_id: bytes
    seq: int
    change: bytes


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RecordLog:
    """The Redis side of the records: one instance per node, over a coredis
    client (bytes responses)."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        stream_length: int = DEFAULT_STREAM_LENGTH,
    ) -> None:
        self.client = client
        self.stream_length = stream_length
        ns = "{" + namespace + "}"
        self.cluster_key = f"{ns}:cluster"
        self.head_key = f"{ns}:head"
        self.stream_key = f"{ns}:changes"
        self.node_prefix = f"{ns}:node:"
        self.nodes_key = f"{ns}:nodes"
        self._tables = sorted(REPLICATED_TABLES, key=lambda t: t.value)
        self._table_keys = {t: f"{ns}:rec:{t.value.decode()}" for t in self._tables}
        self._commit = client.register_script(_COMMIT)
        self._create = client.register_script(_CREATE)
        self._ready = client.register_script(_READY)
        self._head = client.register_script(_HEAD)

    def __repr__(self) -> str:
        return f"<RecordLog {self.cluster_key}>"

    def table_key(self, table: Table) -> str:
        return self._table_keys[table]

    # ---- the cluster ---------------------------------------------------------

    async def cluster(self) -> ClusterInfo | None:
        raw = await self.client.hgetall(self.cluster_key)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        fingerprints: dict[str, dict[int, str]] = {"hmac": {}, "encryption": {}}
        for name, value in fields.items():
            parts = name.split(":")
            if len(parts) == 3 and parts[0] == "fp" and parts[1] in fingerprints:
                fingerprints[parts[1]][int(parts[2])] = value
        return ClusterInfo(
            id=fields.get("id", ""),
            state=fields.get("state", ""),
            created_at=float(fields.get("created_at", "0") or 0),
            fingerprints=fingerprints,
        )

    async def add_fingerprints(self, fingerprints: Mapping[str, Mapping[int, str]]) -> None:
        """Record secret versions the cluster does not know yet (a node
        that rotated its HMAC secret); known ones are never overwritten."""
        for kind, versions in fingerprints.items():
            for version, fp in versions.items():
                await self.client.hsetnx(self.cluster_key, f"fp:{kind}:{version}", fp)

    async def create(
        self, cluster_id: str, fingerprints: Mapping[str, Mapping[int, str]]
    ) -> tuple[bool, str]:
        """Try to create the cluster as ``cluster_id`` (state ``seeding``):
        (True, id) if this node won, (False, the existing id) otherwise."""
        args: list[str | float] = [cluster_id, time.time(), SEEDING_TIMEOUT]
        for kind, versions in fingerprints.items():
            for version, fp in versions.items():
                args += [f"fp:{kind}:{version}", fp]
        keys = [self.cluster_key, self.head_key, self.stream_key, *self._table_keys.values()]
        reply: Any = await self._create(keys=keys, args=args)
        created, found = reply
        return bool(created), _text(found)

    async def seed(self, rows: Iterable[tuple[Table, bytes, bytes]]) -> int:
        """Upload a seeding node's records, in chunks; returns how many."""
        count = 0
        chunk: dict[Table, dict[bytes, bytes]] = {}
        pending = 0
        for table, key, value in rows:
            chunk.setdefault(table, {})[key] = value
            pending += 1
            count += 1
            if pending >= SEED_CHUNK:
                await self._upload(chunk)
                chunk, pending = {}, 0
        if chunk:
            await self._upload(chunk)
        return count

    async def _upload(self, chunk: Mapping[Table, Mapping[bytes, bytes]]) -> None:
        for table, rows in chunk.items():
            await self.client.hset(self._table_keys[table], dict(rows))

    async def ready(self, cluster_id: str) -> bool:
        done: Any = await self._ready(keys=[self.cluster_key, self.head_key], args=[cluster_id])
        return bool(done)

    # ---- changes -------------------------------------------------------------

    async def head(self) -> Head:
        reply: Any = await self._head(keys=[self.cluster_key, self.head_key])
        cluster, seq, stream_id = reply
        sid = stream_id if isinstance(stream_id, bytes) else str(stream_id).encode()
        return Head(_text(cluster), int(seq), sid)

    async def commit(
        self,
        cluster_id: str,
        base_seq: int,
        node: str,
        mutations: Sequence[Mutation],
    ) -> CommitOutcome:
        """Submit one change made at ``base_seq`` (see the module docstring)."""
        keys = [self.cluster_key, self.head_key, self.stream_key]
        index: dict[Table, int] = {}
        args: list[str | bytes | int] = [
            cluster_id,
            base_seq,
            self.stream_length,
            encode_change(node, time.time(), mutations),
            len(mutations),
        ]
        for table, key, value in mutations:
            if table not in index:
                keys.append(self._table_keys[table])
                index[table] = len(keys)
            args += [index[table], key, b"d" if value is None else b"p", value or b""]
        reply: Any = await self._commit(keys=keys, args=args)
        status = int(reply[0])
        if status == 1:
            sid = reply[1] if isinstance(reply[1], bytes) else str(reply[1]).encode()
            return CommitOutcome(True, seq=int(reply[2]), stream_id=sid)
        if status == 0:
            return CommitOutcome(False, head_seq=int(reply[1]))
        return CommitOutcome(False, cluster_gone=True)

    async def read(self, after: bytes, *, count: int, block_ms: int | None) -> list[StreamEntry]:
        """Changes after stream id ``after`` (oldest first), waiting up to
        ``block_ms`` for one when there is none (None: do not wait)."""
        reply = await self.client.xread({self.stream_key: after}, count=count, block=block_ms)
        if not reply:
            return []
        entries: list[StreamEntry] = []
        for found in reply.values():
            for entry in found:
                fields = entry.field_values
                ident: Any = entry.identifier
                sid = ident if isinstance(ident, bytes) else str(ident).encode()
                change: Any = fields[b"c"]
                entries.append(StreamEntry(sid, int(fields[b"n"]), bytes(change)))
        return entries

    async def snapshot(self) -> tuple[Head, dict[Table, dict[bytes, bytes]]]:
        """Every record, and a head at or before the state read: the changes
        after it, applied again, bring a replica built from it up to date."""
        head = await self.head()
        tables: dict[Table, dict[bytes, bytes]] = {}
        for table, key in self._table_keys.items():
            rows: dict[bytes, bytes] = {}
            async for field, value in self.client.hscan_iter(key, count=1000):
                rows[bytes(field)] = bytes(value)
            tables[table] = rows
        return head, tables

    async def ping(self) -> float:
        """One round trip; returns its duration in seconds."""
        started = time.perf_counter()
        await self.client.ping()
        return time.perf_counter() - started
