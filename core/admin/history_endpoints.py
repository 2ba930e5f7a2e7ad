"""The admin API's usage history rows (``endpoints.ENDPOINTS`` takes them
in): ``GET /keys/{id}/usage/history`` and ``GET /identities/{id}/usage/history``.

``endpoints`` imports this module, so the ``Endpoint`` class comes in as an
argument (and ``Call`` for the type checker only): no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msgspec import Struct

from triogate.admin.backend import AdminBackend
from triogate.control.history import HistoryQuery, UsageHistory

if TYPE_CHECKING:
    from triogate.admin.endpoints import Call, Endpoint

__all__ = ["history_endpoints"]


async def key_history(gw: AdminBackend, call: Call) -> Struct:
    return await gw.history.read_key_history(call.params["id"], call.query)


async def identity_history(gw: AdminBackend, call: Call) -> Struct:
    return await gw.history.read_identity_history(call.params["id"], call.query)


def history_endpoints(endpoint: type[Endpoint]) -> tuple[Endpoint, ...]:
    return (
        endpoint(
            "GET",
            "/keys/{id}/usage/history",
            "A key's requests by outcome and status class per minute, hour or day",
            "admin:keys:read",
            key_history,
            query=HistoryQuery,
            response=UsageHistory,
            tags=("keys",),
        ),
        endpoint(
            "GET",
            "/identities/{id}/usage/history",
            "An identity's requests (all its keys') by outcome per minute, hour or day",
            "admin:identities:read",
            identity_history,
            query=HistoryQuery,
            response=UsageHistory,
            tags=("identities",),
        ),
    )
