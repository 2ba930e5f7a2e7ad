"""A cluster node's records: opening the data directory as a replica of the
cluster's, and the ``ClusterNode`` the admin API and metrics look at.

``open_records(config)`` is what the runtime opens instead of the bare data
directory. Without ``[cluster] redis_url`` it is exactly
``open_data_dir``. With it:

1. **Before the data directory is touched**, the cluster's secrets are
   checked (when Redis answers): a node whose secrets are not the
   cluster's, or that has none while the cluster exists, refuses to start
   with one sentence (``SecretsError``; exit status 1) and writes nothing.
2. The data directory opens as usual (its marker checks the local store
   against the same secrets).
3. The node joins (``Follower.join``). Redis unreachable: a node that was
   in the cluster starts from its replica, detached (the follower joins
   when Redis is back); a new node refuses (``StoreUnavailable``): it has
   nothing to serve.
4. The follower (and, for a server, the heartbeat) run in this context's
   nursery; the store handed out is a ``ClusterStore``.
"""

from __future__ import annotations

import logging
import re
import secrets as token
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio

from triogate.cluster.follower import Follower
from triogate.cluster.membership import Heartbeat, NodeList, list_nodes
from triogate.cluster.recordlog import RecordLog
from triogate.cluster.redis import REDIS_ERRORS, open_redis, redacted
from triogate.cluster.replica import NODE_KEY
from triogate.cluster.status import ReplicaHealth, ReplicaState, ReplicaStatus
from triogate.cluster.store import ClusterStore
from triogate.config import Config
from triogate.control.crypto import ServerSecrets, compare_fingerprints, load_secrets
from triogate.control.datadir import open_data_dir
from triogate.errors import SecretsError, SecretsMissing, StoreUnavailable, StoreUnreachable
from triogate.storage import Store, Table, WriteTxn

__all__ = ["ClusterNode", "open_records"]

log = logging.getLogger("triogate.cluster")

#: Bounds the round trips of the records' own calls (a node list, a join).
STREAM_TIMEOUT: Final = 5.0


class ClusterNode:
    """One node's view of the cluster (``/health``, ``GET /cluster``, metrics)."""

    def __init__(
        self,
        url: str,
        log_: RecordLog,
        status: ReplicaStatus,
        follower: Follower,
        store: ClusterStore,
        heartbeat: Heartbeat,
    ) -> None:
        self.url = redacted(url)
        self.log = log_
        self.status = status
        self.follower = follower
        self.store = store
        self.heartbeat = heartbeat

    def __repr__(self) -> str:
        return f"<ClusterNode {self.status.node} {self.url} {self.status.state}>"

    @property
    def node_id(self) -> str:
        return self.status.node

    def health(self) -> ReplicaHealth:
        return self.status.health()

    def announce(self, *, proxy_url: str | None, admin_url: str | None) -> None:
        """Where this node listens (its heartbeat says so)."""
        self.heartbeat.proxy_url = proxy_url or self.heartbeat.proxy_url
        self.heartbeat.admin_url = admin_url or self.heartbeat.admin_url

    async def nodes(self) -> NodeList:
        """The live nodes; ``StoreUnreachable`` while Redis is not answering."""
        try:
            with trio.fail_after(STREAM_TIMEOUT):
                return await list_nodes(self.log)
        except REDIS_ERRORS as exc:
            self.status.failed(exc)
            raise StoreUnreachable(
                f"the cluster's Redis is unreachable ({type(exc).__name__}): the node list "
                "lives there; this node's own state is on /health"
            ) from None


async def _preflight(config: Config, log_: RecordLog) -> None:
    """The secrets check before the data directory is touched (module doc, 1)."""
    try:
        with trio.fail_after(config.cluster.connect_timeout_seconds + 1):
            info = await log_.cluster()
    except REDIS_ERRORS:
        return  # decided after opening: was this node in the cluster?
    if info is None or info.state != "ready":
        return
    try:
        secrets = load_secrets(config.data_dir, create=False)
    except SecretsMissing:
        raise SecretsError(
            "the cluster exists but this node has no secrets (TRIOGATE_HMAC_SECRET and "
            "TRIOGATE_ENCRYPTION_KEYS are not set and there is no secrets file in "
            f"{config.data_dir}): give it the cluster's, as every node has"
        ) from None
    why = compare_fingerprints(info.fingerprints, secrets.fingerprints())
    if why is not None:
        raise SecretsError(
            f"the secrets from {secrets.source} are not the cluster's ({why}): give every "
            "node the same TRIOGATE_HMAC_SECRET and TRIOGATE_ENCRYPTION_KEYS, or a copy of "
            "the first node's secrets file"
        )


def _node_id(txn: WriteTxn) -> str:
    """This data directory's node id: made once, kept across restarts."""
    raw = txn.get(Table.META, NODE_KEY)
    if raw is not None:
        return raw.decode()
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "node"
    node = f"{host}-{token.token_hex(3)}"
    txn.put(Table.META, NODE_KEY, node.encode())
    return node


@asynccontextmanager
async def open_records(
    config: Config, *, heartbeat: bool = True
) -> AsyncIterator[tuple[Store, ServerSecrets, ClusterNode | None]]:
    """The store, the secrets and (in a cluster) the node: see the module
    docstring. ``heartbeat`` is false for the CLI: it writes through the
    cluster but is not a node that serves."""
    map_size = config.storage.map_size_mb << 20
    url = config.cluster.redis_url
    if url is None:
        async with open_data_dir(config.data_dir, map_size=map_size) as (store, secrets):
            yield store, secrets, None
        return
    # The link's client: Sentinel URLs work, no blind retries, and its
    # stream timeout (2 s at least) outlasts a blocking XREAD (1 s).
    async with open_redis(config.cluster, health=False) as link:
        log_ = RecordLog(link.client)
        await _preflight(config, log_)
        async with open_data_dir(config.data_dir, map_size=map_size) as (local, secrets):
            node_id = await local.write(_node_id)
            status = ReplicaStatus(node_id, trio.current_time)
            follower = Follower(
                local, log_, status, secrets.fingerprints, secrets_source=secrets.source
            )
            try:
                with trio.fail_after(config.cluster.connect_timeout_seconds + STREAM_TIMEOUT):
                    await follower.join()
            except REDIS_ERRORS as exc:
                if follower.position() is None:
                    raise StoreUnavailable(
                        f"cannot reach the cluster's Redis at {redacted(url)} "
                        f"({type(exc).__name__}): a new node joins only when Redis answers"
                    ) from None
                status.failed(exc)
                status.state = ReplicaState.DETACHED
                log.warning(
                    "cluster Redis %s unreachable (%s): serving from this node's replica; "
                    "admin writes are refused until it is back",
                    redacted(url),
                    exc,
                )
            shared = ClusterStore(local, log_, follower, node_id)
            beat = Heartbeat(log_, status)
            node = ClusterNode(url, log_, status, follower, shared, beat)
            async with _service_tasks(follower, beat if heartbeat else None):
                yield shared, secrets, node


@asynccontextmanager
async def _service_tasks(follower: Follower, beat: Heartbeat | None) -> AsyncIterator[None]:
    """The follower and the heartbeat, cancelled when the block ends (the
    caller's own exception comes back unwrapped, as from ``open_lmdb_store``)."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(follower.run)
            if beat is not None:
                await nursery.start(beat.run)
            try:
                yield
            finally:
                if beat is not None:
                    await beat.leave()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
