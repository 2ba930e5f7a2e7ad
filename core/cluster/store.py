"""``ClusterStore``: the ``Store`` a cluster node's services write through.

Theory of operation
-------------------
Reads (``read``, ``get_through``) are the local replica's: the data plane
validates keys without a network round trip, and keeps doing so while Redis
is away.

``write(fn)`` runs ``fn`` against the replica first (``replica.run_recorded``):

* a function that wrote only local tables (a usage flush) is done: its
  writes were kept, Redis is not involved;
* otherwise its writes were undone and recorded. Under this node's commit
  lock (one admin write in flight per node, so this node's writes never
  refuse each other) the recorded change is submitted to Redis, based on
  the sequence number the replica stood at (``RecordLog.commit``). Accepted:
  the node applies it to its replica (``apply_own``: read-your-writes) and
  the write returns the function's result. Refused because another change
  came first: the node waits (bounded) until its replica has that change
  and runs ``fn`` again, at most ``MAX_ATTEMPTS`` times. An error that
  ``fn`` raises (a 409, a 404) propagates as it does on a single node.

While the node is not in the cluster (Redis unreachable, joining, refused)
or Redis fails during the commit, the write raises ``StoreUnreachable``
(503 ``STORE_UNAVAILABLE``) and nothing of it is written. A commit whose
answer was lost (the connection broke after Redis applied it) is not
retried: it reaches the replica through the stream like any other change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, Final, TypeVar

import trio

from triogate.cluster.follower import Follower
from triogate.cluster.recordlog import RecordLog
from triogate.cluster.redis import REDIS_ERRORS
from triogate.cluster.replica import Recorded, apply_own, run_recorded
from triogate.cluster.status import ReplicaState
from triogate.errors import StoreUnreachable
from triogate.storage import ReadTxn, Store, StoreStatistics, Table, WriteTxn

__all__ = ["MAX_ATTEMPTS", "ClusterStore"]

log = logging.getLogger("triogate.cluster")

T = TypeVar("T")

MAX_ATTEMPTS: Final = 20  # runs of one write refused by other nodes' changes
CATCH_UP_SECONDS: Final = 5.0  # waiting for the replica to reach a change
COMMIT_SECONDS: Final = 5.0  # one commit's round trip to Redis


class ClusterStore:
    """A ``Store`` over the node's replica, writing through the cluster."""

    def __init__(self, local: Store, log_: RecordLog, follower: Follower, node: str) -> None:
        self.local = local
        self.log = log_
        self.follower = follower
        self.node = node
        self._commit_lock = trio.Lock()
        self.commits = 0
        self.conflicts = 0
        self.refused = 0

    def __repr__(self) -> str:
        return f"<ClusterStore {self.node} over {self.local!r}>"

    def read(self) -> AbstractContextManager[ReadTxn]:
        return self.local.read()

    def get_through(self, index: Table, key: bytes, table: Table) -> bytes | None:
        return self.local.get_through(index, key, table)

    def generation(self) -> int:
        return self.local.generation()

    def statistics(self) -> StoreStatistics:
        return self.local.statistics()

    def _unreachable(self, why: str) -> StoreUnreachable:
        self.refused += 1
        return StoreUnreachable(
            f"the cluster's Redis is unreachable ({why}): the write was not made; "
            "reads and proxying go on from this node's replica, try again later"
        )

    async def write(self, fn: Callable[[WriteTxn], T]) -> T:
        recorded: Recorded[T] = await self.local.write(partial(run_recorded, fn))
        if not recorded.shared:
            return recorded.result
        async with self._commit_lock:
            for attempt in range(MAX_ATTEMPTS):
                if (
                    attempt
                    or recorded.position is None
                    or (recorded.position.seq != self.follower.status.applied_seq)
                ):
                    # Another write of this node went first (or this is a
                    # retry): run again on the replica as it is now.
                    recorded = await self.local.write(partial(run_recorded, fn))
                    if not recorded.shared:
                        return recorded.result
                status = self.follower.status
                position = recorded.position
                if status.state is not ReplicaState.READY or position is None:
                    raise self._unreachable(f"this node is {status.state.value}")
                try:
                    with trio.fail_after(COMMIT_SECONDS):
                        outcome = await self.log.commit(
                            position.cluster, position.seq, self.node, recorded.shared
                        )
                except REDIS_ERRORS as exc:
                    self.follower.status.failed(exc)
                    raise self._unreachable(type(exc).__name__) from None
                if outcome.accepted:
                    await self.local.write(
                        partial(
                            _apply_own,
                            position.cluster,
                            outcome.seq,
                            outcome.stream_id,
                            recorded,
                        )
                    )
                    self.commits += 1
                    self.follower.note_applied(outcome.seq)
                    return recorded.result
                if outcome.cluster_gone:
                    self.follower.lost_cluster()
                    raise self._unreachable("the cluster is being set up again")
                self.conflicts += 1
                status.saw_head(outcome.head_seq)
                with trio.move_on_after(CATCH_UP_SECONDS) as waited:
                    await self.follower.wait_applied(outcome.head_seq)
                if waited.cancelled_caught:
                    raise self._unreachable("this node's replica is not catching up")
        raise self._unreachable(f"{MAX_ATTEMPTS} attempts were refused by concurrent writes")


def _apply_own(
    cluster: str, seq: int, stream_id: bytes, recorded: Recorded[Any], txn: WriteTxn
) -> None:
    apply_own(txn, cluster, seq, stream_id, recorded.shared, recorded.local)
