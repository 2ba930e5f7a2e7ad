"""Which nodes are alive: each node's heartbeat, and ``GET /cluster``'s list.

Every ``HEARTBEAT_SECONDS`` a node writes its record (``NodeInfo``: id,
addresses, version, replica lag) under ``{ns}:node:<id>`` with a time to
live of ``NODE_TTL_SECONDS``, and its id with that expiry in the sorted set
``{ns}:nodes``. A node that stops (or is cut off) simply expires: the list
is the ids whose expiry is still ahead, with their records. The same beat
measures Redis's round trip and reads the cluster's head, which is how a
node that receives no changes still knows how far behind it is.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import msgspec
import trio
from coredis.tokens import PureToken

from triogate import __version__
from triogate.cluster.recordlog import RecordLog
from triogate.cluster.redis import REDIS_ERRORS
from triogate.cluster.status import ReplicaStatus

__all__ = [
    "HEARTBEAT_SECONDS",
    "NODE_TTL_SECONDS",
    "Heartbeat",
    "NodeInfo",
    "NodeList",
    "list_nodes",
]

log = logging.getLogger("triogate.cluster")

HEARTBEAT_SECONDS: Final = 1.0
NODE_TTL_SECONDS: Final = 5


class NodeInfo(msgspec.Struct, frozen=True):
    """One live node, as it last described itself."""

    id: str
    version: str
    proxy_url: str | None
    admin_url: str | None
    started_at: float
    seen_at: float
    state: str
    applied_seq: int
    lag_entries: int
    lag_seconds: float


class NodeList(msgspec.Struct, frozen=True):
    cluster_id: str | None
    head_seq: int
    items: list[NodeInfo]


_decoder = msgspec.json.Decoder(NodeInfo)


class Heartbeat:
    """This node's beat (a service task: ``run``)."""

    def __init__(self, log_: RecordLog, status: ReplicaStatus) -> None:
        self.log = log_
        self.status = status
        self.started_at = time.time()
        self.proxy_url: str | None = None
        self.admin_url: str | None = None

    def __repr__(self) -> str:
        return f"<Heartbeat {self.status.node}>"

    def info(self) -> NodeInfo:
        s = self.status
        return NodeInfo(
            id=s.node,
            version=__version__,
            proxy_url=self.proxy_url,
            admin_url=self.admin_url,
            started_at=self.started_at,
            seen_at=time.time(),
            state=s.state.value,
            applied_seq=s.applied_seq,
            lag_entries=s.lag_entries,
            lag_seconds=round(s.lag_seconds, 3),
        )

    async def beat(self) -> None:
        rtt = await self.log.ping()
        self.status.reached(rtt)
        head = await self.log.head()
        if head.cluster and head.cluster == self.status.cluster_id:
            self.status.saw_head(head.seq)
        now = time.time()
        client = self.log.client
        await client.set(
            self.log.node_prefix + self.status.node,
            msgspec.json.encode(self.info()),
            ex=NODE_TTL_SECONDS,
        )
        await client.zadd(self.log.nodes_key, {self.status.node: now + NODE_TTL_SECONDS})
        await client.zremrangebyscore(self.log.nodes_key, float("-inf"), now)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.beat()
            except REDIS_ERRORS as exc:
                self.status.failed(exc)
            await trio.sleep(HEARTBEAT_SECONDS)

    async def leave(self) -> None:
        """Take this node off the list at once (a clean shutdown)."""
        with trio.move_on_after(1.0):
            try:
                await self.log.client.delete([self.log.node_prefix + self.status.node])
                await self.log.client.zrem(self.log.nodes_key, [self.status.node])
            except REDIS_ERRORS:
                pass


async def list_nodes(log_: RecordLog) -> NodeList:
    """The nodes whose heartbeat has not expired, by id. Raises a Redis
    error when Redis cannot be reached."""
    now = time.time()
    ids = await log_.client.zrange(log_.nodes_key, now, "+inf", sortby=PureToken.BYSCORE)
    names = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
    head = await log_.head()
    items: list[NodeInfo] = []
    if names:
        raws = await log_.client.mget([log_.node_prefix + n for n in names])
        for raw in raws:
            if raw is None:
                continue
            try:
                items.append(_decoder.decode(raw))
            except msgspec.DecodeError:
                continue  # a newer node's format: not ours to show
    items.sort(key=lambda n: n.id)
    return NodeList(cluster_id=head.cluster or None, head_seq=head.seq, items=items)
