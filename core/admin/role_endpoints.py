"""The admin API's ``/roles`` rows (``endpoints.ENDPOINTS`` takes them in).

``endpoints`` imports this module, so the ``Endpoint`` class comes in as an
argument (and ``Call`` for the type checker only): no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from msgspec import Meta, Struct

from triogate.admin.backend import AdminBackend
from triogate.control.roles import (
    CreateRoleRequest,
    DeletedRole,
    RolePage,
    RoleView,
    UpdateRoleRequest,
)

if TYPE_CHECKING:
    from triogate.admin.endpoints import Call, Endpoint

__all__ = ["RoleListQuery", "role_endpoints"]

READ = "admin:roles:read"
WRITE = "admin:roles:write"


class RoleListQuery(Struct, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=100, description="page size, 1-100")] = 50
    cursor: (
        Annotated[str, Meta(max_length=200, description="next_cursor of the previous page")] | None
    ) = None


async def create_role(gw: AdminBackend, call: Call) -> Struct:
    return await gw.roles.create(call.body, call.actor)


async def list_roles(gw: AdminBackend, call: Call) -> Struct:
    q: RoleListQuery = call.query
    return gw.roles.list(limit=q.limit, cursor=q.cursor)


async def get_role(gw: AdminBackend, call: Call) -> Struct:
    return gw.roles.get(call.params["id"])


async def update_role(gw: AdminBackend, call: Call) -> Struct:
    return await gw.roles.update(call.params["id"], call.body, call.actor)


async def delete_role(gw: AdminBackend, call: Call) -> Struct:
    return await gw.roles.delete(call.params["id"], call.actor)


def role_endpoints(endpoint: type[Endpoint]) -> tuple[Endpoint, ...]:
    tags = ("roles",)
    return (
        endpoint(
            "POST",
            "/roles",
            "Create a role: a named bundle of scopes keys can carry",
            WRITE,
            create_role,
            request=CreateRoleRequest,
            response=RoleView,
            status=201,
            tags=tags,
        ),
        endpoint(
            "GET",
            "/roles",
            "List roles, newest first, with cursor paging",
            READ,
            list_roles,
            query=RoleListQuery,
            response=RolePage,
            tags=tags,
        ),
        endpoint("GET", "/roles/{id}", "Read a role", READ, get_role, response=RoleView, tags=tags),
        endpoint(
            "PATCH",
            "/roles/{id}",
            "Change a role's scopes or description (every key naming it, next request on)",
            WRITE,
            update_role,
            request=UpdateRoleRequest,
            response=RoleView,
            tags=tags,
        ),
        endpoint(
            "DELETE",
            "/roles/{id}",
            "Delete a role no key names (409 ROLE_IN_USE otherwise)",
            WRITE,
            delete_role,
            response=DeletedRole,
            tags=tags,
        ),
    )
