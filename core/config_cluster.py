"""``[cluster]``: the config of nodes sharing one Redis (``triogate.cluster``).

Its own module so that ``triogate.config`` stays one screenful per concern;
``triogate.config`` re-exports ``ClusterConfig``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from triogate.events_config import Identifier

__all__ = ["ClusterConfig", "RedisUrl"]

RedisUrl = Annotated[
    str,
    Meta(
        pattern=r"^(redis|rediss|unix|redis\+sentinel|rediss\+sentinel)://\S+$",
        max_length=2048,
        description="redis://, rediss:// (TLS), unix:// or redis+sentinel:// URL",
    ),
]


class ClusterConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """``[cluster]``: nodes sharing one Redis (``triogate.cluster``). Without
    ``redis_url`` the node is a single gateway, as before."""

    redis_url: RedisUrl | None = None
    fallback: Annotated[
        Literal["local", "deny"],
        Meta(description="limits while Redis is unreachable: this node decides, or 503"),
    ] = "local"
    connect_timeout_seconds: Annotated[float, Meta(ge=0.01, le=60)] = 2.0
    command_timeout_seconds: Annotated[
        float, Meta(ge=0.001, le=60, description="a limit decision's wait before the fallback")
    ] = 0.25
    health_interval_seconds: Annotated[float, Meta(ge=0.01, le=60)] = 1.0
    batch_max: Annotated[int, Meta(ge=1, le=10_000, description="decisions per pipeline")] = 256
    local_routes: Annotated[
        list[Identifier], Meta(max_length=1024, description="routes whose limits stay per node")
    ] = []
    local_keyspaces: Annotated[
        list[Identifier], Meta(max_length=64, description="keyspaces whose limits stay per node")
    ] = []
