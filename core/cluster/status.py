"""How far this node's replica is behind, and how its Redis is doing:
sans-IO bookkeeping that the replicator, the cluster store and the heartbeat
update, and that ``/health``, ``GET /cluster`` and the metrics read.

Lag is counted two ways: **entries** (changes the cluster accepted that this
replica has not applied: the newest sequence number seen, from the stream,
a heartbeat's head read or a refused commit, minus the applied one) and
**seconds** (how long the replica has been behind without interruption: 0
when it is current). While Redis is unreachable the lag is unknown and the
last figures stay, with ``connected`` false.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec

__all__ = ["ReplicaHealth", "ReplicaState", "ReplicaStatus"]


class ReplicaState(enum.StrEnum):
    JOINING = "joining"  # not yet part of the cluster (start-up, or Redis came back)
    READY = "ready"  # in the cluster, following the stream
    DETACHED = "detached"  # Redis unreachable: serving from the replica, writes refused
    REFUSED = "refused"  # the cluster's secrets are not this node's: writes refused


class ReplicaHealth(msgspec.Struct, frozen=True):
    """One node's cluster status, as ``/health`` and ``GET /cluster`` show it."""

    node: str
    state: str
    in_cluster: bool
    connected: bool
    cluster_id: str | None
    applied_seq: int
    head_seq: int
    lag_entries: int
    lag_seconds: float
    redis_rtt_seconds: float | None
    errors: int
    resyncs: int
    last_error: str | None


class ReplicaStatus:
    """The mutable tracker (one per node)."""

    def __init__(self, node: str, clock: Callable[[], float]) -> None:
        self.node = node
        self._clock = clock
        self.state = ReplicaState.JOINING
        self.connected = False
        self.cluster_id: str | None = None
        self.applied_seq = 0
        self.head_seq = 0
        self.behind_since: float | None = None
        self.rtt: float | None = None
        self.errors = 0
        self.resyncs = 0
        self.applied_changes = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"<ReplicaStatus {self.node} {self.state} {self.applied_seq}/{self.head_seq}>"

    def _recompute(self) -> None:
        if self.head_seq > self.applied_seq:
            if self.behind_since is None:
                self.behind_since = self._clock()
        else:
            self.behind_since = None

    def saw_head(self, seq: int) -> None:
        """The cluster has accepted ``seq`` changes (or more)."""
        if seq > self.head_seq:
            self.head_seq = seq
        self._recompute()

    def applied(self, seq: int) -> None:
        if seq > self.applied_seq:
            self.applied_changes += seq - self.applied_seq
            self.applied_seq = seq
        self.saw_head(seq)

    def rebuilt(self, cluster_id: str, seq: int) -> None:
        """A replica (re)built from a snapshot at ``seq``, or newly seeded."""
        same = cluster_id == self.cluster_id
        self.cluster_id = cluster_id
        self.resyncs += 1
        self.applied_seq = seq
        self.head_seq = max(self.head_seq, seq) if same else seq
        self._recompute()

    def joined(self, cluster_id: str, seq: int) -> None:
        """Back in the cluster this replica follows, at ``seq``."""
        self.cluster_id = cluster_id
        self.applied(seq)

    def reached(self, rtt: float) -> None:
        """A round trip to Redis succeeded."""
        self.connected = True
        # Smoothed: one slow reply does not make the metric jump.
        self.rtt = rtt if self.rtt is None else 0.8 * self.rtt + 0.2 * rtt

    def failed(self, error: BaseException | str) -> None:
        """Redis could not be reached (or answered an error)."""
        self.connected = False
        self.errors += 1
        self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if self.state is ReplicaState.READY:
            self.state = ReplicaState.DETACHED

    @property
    def lag_entries(self) -> int:
        return max(0, self.head_seq - self.applied_seq)

    @property
    def lag_seconds(self) -> float:
        if self.behind_since is None:
            return 0.0
        return max(0.0, self._clock() - self.behind_since)

    def health(self) -> ReplicaHealth:
        return ReplicaHealth(
            node=self.node,
            state=self.state.value,
            in_cluster=self.state is ReplicaState.READY,
            connected=self.connected,
            cluster_id=self.cluster_id,
            applied_seq=self.applied_seq,
            head_seq=self.head_seq,
            lag_entries=self.lag_entries,
            lag_seconds=round(self.lag_seconds, 3),
            redis_rtt_seconds=None if self.rtt is None else round(self.rtt, 6),
            errors=self.errors,
            resyncs=self.resyncs,
            last_error=self.last_error,
        )
