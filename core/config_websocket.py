"""``[routes.websocket]``: a route's WebSocket settings (docs/websockets.md),
in their own module so ``config`` stays short; ``RouteConfig.websocket`` is
``true`` (the default: upgrades relayed with these defaults), ``false`` (an
upgrade is refused 400 ``WEBSOCKET_DISABLED``) or this table. Like
``config``, this is the shared base: it imports no layer.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

__all__ = ["DEFAULT_WEBSOCKET", "WebSocketConfig", "websocket_settings"]


class WebSocketConfig(Struct, frozen=True, forbid_unknown_fields=True):
    idle_timeout_seconds: Annotated[
        float,
        Meta(
            ge=0.001,
            le=86400,
            description="no frame either way for this long: both sides get close 1001",
        ),
    ] = 300.0
    max_frame_bytes: Annotated[
        int,
        Meta(
            ge=125,
            le=2**31,
            description="a frame declaring a longer payload: both sides get close 1009",
        ),
    ] = 1048576


DEFAULT_WEBSOCKET = WebSocketConfig()


def websocket_settings(value: bool | WebSocketConfig) -> WebSocketConfig | None:
    """A route's ``websocket`` setting as the relay uses it (None: off)."""
    if value is True:
        return DEFAULT_WEBSOCKET
    if value is False:
        return None
    return value
