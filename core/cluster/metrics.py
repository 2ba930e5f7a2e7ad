"""The records' metrics (a collector the runtime registers next to the
gateway's own, in ``Metrics.registry``): read from the node's status at
scrape time, nothing maintained in between."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from triogate.cluster.status import ReplicaState, ReplicaStatus
from triogate.cluster.store import ClusterStore

__all__ = ["RecordsCollector"]


class RecordsCollector(Collector):
    def __init__(self, status: ReplicaStatus, store: ClusterStore) -> None:
        self.status = status
        self.store = store

    def __repr__(self) -> str:
        return f"<RecordsCollector {self.status.node}>"

    def collect(self) -> Iterable[Metric]:
        s = self.status
        state = GaugeMetricFamily(
            "triogate_cluster_state",
            "This node's cluster state (1 for the current one)",
            labels=["state"],
        )
        for candidate in ReplicaState:
            state.add_metric([candidate.value], 1.0 if s.state is candidate else 0.0)
        yield state
        yield GaugeMetricFamily(
            "triogate_cluster_redis_up",
            "1 when the last round trip to Redis succeeded",
            value=1.0 if s.connected else 0.0,
        )
        yield GaugeMetricFamily(
            "triogate_cluster_replica_lag_entries",
            "Changes the cluster accepted that this node's replica has not applied",
            value=s.lag_entries,
        )
        yield GaugeMetricFamily(
            "triogate_cluster_replica_lag_seconds",
            "How long this node's replica has been behind (0: current)",
            value=s.lag_seconds,
        )
        yield GaugeMetricFamily(
            "triogate_cluster_replica_applied_seq",
            "Sequence number of the last change applied to this node's replica",
            value=s.applied_seq,
        )
        if s.rtt is not None:
            yield GaugeMetricFamily(
                "triogate_cluster_redis_rtt_seconds",
                "Round trip to Redis (PING, smoothed)",
                value=s.rtt,
            )
        yield CounterMetricFamily(
            "triogate_cluster_redis_errors",
            "Redis calls of the records that failed (unreachable, timed out, refused)",
            value=s.errors,
        )
        yield CounterMetricFamily(
            "triogate_cluster_resyncs",
            "Times this node's replica was rebuilt from a snapshot",
            value=s.resyncs,
        )
        writes = CounterMetricFamily(
            "triogate_cluster_record_writes",
            "Admin writes submitted to Redis by this node, by outcome",
            labels=["outcome"],
        )
        writes.add_metric(["accepted"], self.store.commits)
        writes.add_metric(["conflict"], self.store.conflicts)
        writes.add_metric(["refused"], self.store.refused)
        yield writes
