"""Joining the cluster and following its changes: the replicator task.

Theory of operation
-------------------
**Joining** (at start-up, and again whenever Redis was lost and is back):

* no cluster in Redis: this node creates one (``RecordLog.create`` elects one
  creator when several start at once), uploads its own records (an empty
  store uploads nothing; a single gateway turned into the first node keeps
  its keys) and marks it ready;
* a cluster whose secrets' fingerprints are not this node's: ``SecretsError``
  at start-up (the node refuses to start), ``REFUSED`` later;
* a cluster this replica already follows: carry on from its position;
* another cluster (Redis lost its data and another node seeded it again, or
  this node is new): rebuild the replica from a snapshot. A node that has
  records of its own and never joined refuses, rather than drop them.

**Following**: ``XREAD BLOCK`` from the replica's stream id; each batch of
entries is applied in one local write (``replica.apply_change``, in order,
idempotent). A gap (the stream was trimmed past this replica) rebuilds from
a snapshot. A Redis error marks the node ``DETACHED`` (reads and the data
plane go on from the replica, admin writes get 503) and the follower tries
again with a growing pause, then joins again.
"""

from __future__ import annotations

import logging
import secrets as token
from collections.abc import Callable, Mapping
from functools import partial
from typing import Final

import trio

from triogate.cluster.recordlog import RecordLog, StreamEntry
from triogate.cluster.redis import REDIS_ERRORS
from triogate.cluster.replica import (
    Gap,
    Position,
    apply_change,
    export_replicated,
    has_replicated_records,
    read_position,
    rebuild,
    write_position,
)
from triogate.cluster.status import ReplicaState, ReplicaStatus
from triogate.cluster.tables import decode_change
from triogate.control.crypto import compare_fingerprints
from triogate.errors import SecretsError, StoreUnavailable
from triogate.storage import Store, Table, WriteTxn

__all__ = ["Follower"]

log = logging.getLogger("triogate.cluster")

BLOCK_MS: Final = 1000  # one XREAD waits this long (under the link's 2 s stream timeout)
READ_COUNT: Final = 500  # changes applied in one local write at most
RETRY_MIN: Final = 0.1
RETRY_MAX: Final = 2.0
SEEDING_WAIT: Final = 0.2  # while another node seeds the cluster
SEEDING_POLLS: Final = 600  # two minutes of it at most, then give up this round
MAX_REBUILDS: Final = 5  # snapshot attempts in a row before pausing


def _apply_batch(cluster: str, entries: list[StreamEntry], txn: WriteTxn) -> int:
    """Apply ``entries`` in order; returns the sequence number reached.
    Raises ``Gap``: nothing of the batch is kept (the store rolls back)."""
    reached = 0
    for entry in entries:
        apply_change(txn, cluster, entry.seq, entry.stream_id, decode_change(entry.change))
        reached = entry.seq
    position = read_position(txn)
    return reached if position is None else position.seq


class Follower:
    """One node's replica of the cluster's records."""

    def __init__(
        self,
        store: Store,
        log_: RecordLog,
        status: ReplicaStatus,
        fingerprints: Callable[[], dict[str, dict[int, str]]],
        *,
        secrets_source: str = "this node's secrets",
    ) -> None:
        self.store = store
        self.log = log_
        self.status = status
        self.fingerprints = fingerprints
        self.secrets_source = secrets_source
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<Follower {self.status!r}>"

    # ---- waiting for the replica --------------------------------------------

    def _note_applied(self, seq: int) -> None:
        self.status.applied(seq)
        self._changed.set()
        self._changed = trio.Event()

    def note_applied(self, seq: int) -> None:
        """The cluster store applied one of this node's writes itself."""
        self._note_applied(seq)

    async def wait_applied(self, seq: int) -> None:
        """Until the replica has applied change ``seq`` (the caller bounds it)."""
        while self.status.applied_seq < seq:
            await self._changed.wait()

    # ---- joining --------------------------------------------------------------

    def position(self) -> Position | None:
        with self.store.read() as txn:
            return read_position(txn)

    async def join(self) -> None:
        """Make this replica part of the cluster (the module docstring says
        how). Raises ``SecretsError`` or ``StoreUnavailable`` when it must
        not join, a Redis error when Redis cannot be reached."""
        self.status.state = ReplicaState.JOINING
        for _ in range(SEEDING_POLLS):
            info = await self.log.cluster()
            if info is None or info.state != "ready":
                if await self._try_create():
                    return
                await trio.sleep(SEEDING_WAIT)
                continue
            why = compare_fingerprints(info.fingerprints, self.fingerprints())
            if why is not None:
                self.status.state = ReplicaState.REFUSED
                raise SecretsError(
                    f"the secrets from {self.secrets_source} are not the cluster's ({why}): "
                    "give every node the same TRIOGATE_HMAC_SECRET and "
                    "TRIOGATE_ENCRYPTION_KEYS, or a copy of the first node's secrets file"
                )
            await self.log.add_fingerprints(self.fingerprints())
            position = self.position()
            if position is None or position.cluster != info.id:
                if position is None:
                    with self.store.read() as txn:
                        own = has_replicated_records(txn)
                    if own:
                        self.status.state = ReplicaState.REFUSED
                        raise StoreUnavailable(
                            "this node's store holds records of its own and the cluster has "
                            "others: a node joins a cluster with an empty data directory "
                            "(and the cluster's secrets)"
                        )
                await self.resync()
            else:
                self.status.joined(info.id, position.seq)
            self.status.state = ReplicaState.READY
            return
        raise StoreUnavailable("the cluster stayed in its seeding state: try again later")

    async def _try_create(self) -> bool:
        new_id = token.token_hex(8)
        created, cluster_id = await self.log.create(new_id, self.fingerprints())
        if not created:
            return False
        with self.store.read() as txn:
            rows = list(export_replicated(txn))
        count = await self.log.seed(rows)
        if not await self.log.ready(cluster_id):
            return False  # another node took over an abandoned seeding
        position = Position(cluster_id, 0, b"0-0")
        await self.store.write(partial(_set_position, position))
        self.status.rebuilt(cluster_id, 0)
        self.status.state = ReplicaState.READY
        log.info("cluster %s created by this node with its %d records", cluster_id, count)
        return True

    async def resync(self) -> None:
        """Rebuild the replica from a snapshot of the cluster."""
        head, records = await self.log.snapshot()
        position = Position(head.cluster, head.seq, head.stream_id)
        written = await self.store.write(partial(_rebuild, position, records))
        self.status.rebuilt(head.cluster, head.seq)
        self._note_applied(head.seq)
        log.info(
            "replica rebuilt from the cluster's records: %d records at change %d",
            written,
            head.seq,
        )

    # ---- following -----------------------------------------------------------

    async def follow_once(self, *, block_ms: int | None = BLOCK_MS) -> int:
        """Read and apply one batch of changes; returns how many were read."""
        position = self.position()
        assert position is not None
        started = trio.current_time()
        entries = await self.log.read(position.stream_id, count=READ_COUNT, block_ms=block_ms)
        if not entries:
            self.status.reached(trio.current_time() - started if block_ms is None else 0.0)
            return 0
        self.status.connected = True
        self.status.saw_head(entries[-1].seq)
        try:
            reached = await self.store.write(partial(_apply_batch, position.cluster, entries))
        except Gap as gap:
            log.warning("replica fell behind the change stream (%s): rebuilding", gap)
            await self.resync()
            return len(entries)
        self._note_applied(reached)
        return len(entries)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the cluster until cancelled, joining again after a loss."""
        task_status.started()
        pause = RETRY_MIN
        while True:
            try:
                if self.status.state is not ReplicaState.READY:
                    await self.join()
                    log.info(
                        "in the cluster %s at change %d",
                        self.status.cluster_id,
                        self.status.applied_seq,
                    )
                await self.follow_once()
                pause = RETRY_MIN
            except SecretsError as exc:
                # Seen after a re-join: stay out of the cluster, loudly.
                self.status.failed(str(exc))
                self.status.state = ReplicaState.REFUSED
                log.error("%s; admin writes are refused until this is fixed", exc)
                await trio.sleep(RETRY_MAX * 5)
            except (StoreUnavailable, *REDIS_ERRORS) as exc:
                if self.status.state is ReplicaState.READY or self.status.connected:
                    log.warning("cluster Redis unreachable (%s): serving from the replica", exc)
                self.status.failed(exc)
                if self.status.state is not ReplicaState.REFUSED:
                    self.status.state = ReplicaState.DETACHED
                await trio.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)

    def lost_cluster(self) -> None:
        """A commit found another cluster (or none) in Redis: join again."""
        self.status.state = ReplicaState.JOINING


def _set_position(position: Position, txn: WriteTxn) -> None:
    write_position(txn, position)


def _rebuild(
    position: Position, records: Mapping[Table, Mapping[bytes, bytes]], txn: WriteTxn
) -> int:
    return rebuild(txn, position, records)
