"""The admin API's ``/events`` rows (``endpoints.ENDPOINTS`` takes them in):
the webhook delivery log and the manual retry (``triogate.events``).

``endpoints`` imports this module, so the ``Endpoint`` class comes in as an
argument (and ``Call`` for the type checker only): no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta, Struct

from triogate.admin.backend import AdminBackend
from triogate.config import EventType
from triogate.events import DeliveryPage, DeliveryView

if TYPE_CHECKING:
    from triogate.admin.endpoints import Call, Endpoint

__all__ = ["DeliveryListQuery", "event_endpoints"]

READ = "admin:events:read"
WRITE = "admin:events:write"


class DeliveryListQuery(Struct, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=100, description="page size, 1-100")] = 50
    cursor: (
        Annotated[str, Meta(max_length=200, description="next_cursor of the previous page")] | None
    ) = None
    event: EventType | None = None
    status: Literal["pending", "delivered", "failed"] | None = None
    webhook: (
        Annotated[str, Meta(min_length=1, max_length=2048, description="its name, or url")] | None
    ) = None


async def list_deliveries(gw: AdminBackend, call: Call) -> Struct:
    q: DeliveryListQuery = call.query
    return gw.events.log.list(
        limit=q.limit, cursor=q.cursor, event=q.event, status=q.status, webhook=q.webhook
    )


async def get_delivery(gw: AdminBackend, call: Call) -> Struct:
    return gw.events.log.get(call.params["id"])


async def retry_delivery(gw: AdminBackend, call: Call) -> Struct:
    return await gw.events.log.retry(call.params["id"], call.actor)


def event_endpoints(endpoint: type[Endpoint]) -> tuple[Endpoint, ...]:
    tags = ("events",)
    return (
        endpoint(
            "GET",
            "/events/deliveries",
            "Webhook deliveries, newest first: status, attempts, next attempt",
            READ,
            list_deliveries,
            query=DeliveryListQuery,
            response=DeliveryPage,
            tags=tags,
        ),
        endpoint(
            "GET",
            "/events/deliveries/{id}",
            "One webhook delivery with its attempts and event",
            READ,
            get_delivery,
            response=DeliveryView,
            tags=tags,
        ),
        endpoint(
            "POST",
            "/events/deliveries/{id}/retry",
            "Deliver a delivered or failed event again, now (409 while pending)",
            WRITE,
            retry_delivery,
            response=DeliveryView,
            tags=tags,
        ),
    )
