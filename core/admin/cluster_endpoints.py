"""The admin API's cluster rows: ``GET /cluster`` (the live nodes) and
``/health`` with this node's place in the cluster (``endpoints.ENDPOINTS``
takes them in).

``endpoints`` imports this module, so the ``Endpoint`` class comes in as an
argument (and ``Call`` for the type checker only): no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msgspec import Struct

from triogate import __version__
from triogate.admin.backend import AdminBackend
from triogate.cluster.membership import NodeInfo, NodeList
from triogate.cluster.node import ClusterNode
from triogate.cluster.status import ReplicaHealth
from triogate.control.models import Health

if TYPE_CHECKING:
    from triogate.admin.endpoints import Call, Endpoint

__all__ = ["NodeHealth", "NodeInfo", "NodeList", "ReplicaHealth", "cluster_endpoints", "health"]


class NodeHealth(Health, omit_defaults=True):
    """``/health``: a node in a cluster adds where its replica stands."""

    cluster: ReplicaHealth | None = None


def _node(gw: AdminBackend) -> ClusterNode | None:
    # The runtime's gateway has it (None outside a cluster); the admin
    # layer's backend protocol does not need to know.
    node: ClusterNode | None = getattr(gw, "cluster", None)
    return node


async def health(gw: AdminBackend, call: Call) -> Struct:
    node = _node(gw)
    return NodeHealth(
        status="ok", version=__version__, cluster=None if node is None else node.health()
    )


async def list_cluster(gw: AdminBackend, call: Call) -> Struct:
    node = _node(gw)
    if node is None:  # a single gateway: no cluster, no nodes
        return NodeList(cluster_id=None, head_seq=0, items=[])
    return await node.nodes()


def cluster_endpoints(endpoint: type[Endpoint]) -> tuple[Endpoint, ...]:
    return (
        endpoint(
            "GET",
            "/cluster",
            "The live nodes of this gateway's cluster, with their replica lag",
            "admin:system:read",
            list_cluster,
            response=NodeList,
            tags=("system",),
        ),
    )
