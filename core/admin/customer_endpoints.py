"""The admin API's ``/identities`` and ``/plans`` rows (``endpoints.ENDPOINTS``
takes them in).

``endpoints`` imports this module, so the ``Endpoint`` class comes in as an
argument (and ``Call`` for the type checker only): no import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from msgspec import Meta, Struct

from triogate.admin.backend import AdminBackend
from triogate.control.customer_models import (
    CreateIdentityRequest,
    CreatePlanRequest,
    DeletedIdentity,
    DeletedPlan,
    IdentityPage,
    IdentityUsageView,
    IdentityView,
    PlanPage,
    PlanView,
    UpdateIdentityRequest,
    UpdatePlanRequest,
)

if TYPE_CHECKING:
    from triogate.admin.endpoints import Call, Endpoint

__all__ = [
    "IdentityDeleteQuery",
    "IdentityListQuery",
    "PlanListQuery",
    "customer_endpoints",
]

Limit = Annotated[int, Meta(ge=1, le=100, description="page size, 1-100")]
Cursor = Annotated[str, Meta(max_length=200, description="next_cursor of the previous page")]


class IdentityListQuery(Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    cursor: Cursor | None = None
    external_id: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class IdentityDeleteQuery(Struct, forbid_unknown_fields=True):
    revoke_keys: Annotated[
        bool, Meta(description="also revoke the identity's live keys (else 409 if it has any)")
    ] = False


class PlanListQuery(Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    cursor: Cursor | None = None


# ---- handlers -----------------------------------------------------------------


async def create_identity(gw: AdminBackend, call: Call) -> Struct:
    return await gw.identities.create(call.body, call.actor)


async def list_identities(gw: AdminBackend, call: Call) -> Struct:
    q: IdentityListQuery = call.query
    return gw.identities.list(limit=q.limit, cursor=q.cursor, external_id=q.external_id)


async def get_identity(gw: AdminBackend, call: Call) -> Struct:
    return gw.identities.get(call.params["id"])


async def update_identity(gw: AdminBackend, call: Call) -> Struct:
    return await gw.identities.update(call.params["id"], call.body, call.actor)


async def delete_identity(gw: AdminBackend, call: Call) -> Struct:
    q: IdentityDeleteQuery = call.query
    return await gw.identities.delete(call.params["id"], call.actor, revoke_keys=q.revoke_keys)


async def identity_usage(gw: AdminBackend, call: Call) -> Struct:
    return gw.identities.usage(call.params["id"])


async def create_plan(gw: AdminBackend, call: Call) -> Struct:
    return await gw.plans.create(call.body, call.actor)


async def list_plans(gw: AdminBackend, call: Call) -> Struct:
    q: PlanListQuery = call.query
    return gw.plans.list(limit=q.limit, cursor=q.cursor)


async def get_plan(gw: AdminBackend, call: Call) -> Struct:
    return gw.plans.get(call.params["id"])


async def update_plan(gw: AdminBackend, call: Call) -> Struct:
    return await gw.plans.update(call.params["id"], call.body, call.actor)


async def delete_plan(gw: AdminBackend, call: Call) -> Struct:
    return await gw.plans.delete(call.params["id"], call.actor)


def customer_endpoints(endpoint: type[Endpoint]) -> tuple[Endpoint, ...]:
    ids = ("identities",)
    plans = ("plans",)
    id_read, id_write = "admin:identities:read", "admin:identities:write"
    plan_read, plan_write = "admin:plans:read", "admin:plans:write"
    return (
        endpoint(
            "POST",
            "/identities",
            "Create an identity: a customer whose keys share one pool of limits and credits",
            id_write,
            create_identity,
            request=CreateIdentityRequest,
            response=IdentityView,
            status=201,
            tags=ids,
        ),
        endpoint(
            "GET",
            "/identities",
            "List identities, newest first, with cursor paging (external_id= finds one)",
            id_read,
            list_identities,
            query=IdentityListQuery,
            response=IdentityPage,
            tags=ids,
        ),
        endpoint(
            "GET",
            "/identities/{id}",
            "Read an identity",
            id_read,
            get_identity,
            response=IdentityView,
            tags=ids,
        ),
        endpoint(
            "PATCH",
            "/identities/{id}",
            "Change an identity (enabled: false disables every key of it)",
            id_write,
            update_identity,
            request=UpdateIdentityRequest,
            response=IdentityView,
            tags=ids,
        ),
        endpoint(
            "DELETE",
            "/identities/{id}",
            "Delete an identity (409 IDENTITY_HAS_KEYS with live keys, unless revoke_keys=true)",
            id_write,
            delete_identity,
            query=IdentityDeleteQuery,
            response=DeletedIdentity,
            tags=ids,
        ),
        endpoint(
            "GET",
            "/identities/{id}/usage",
            "Usage of an identity: its keys' summed, and the pool's credits left",
            id_read,
            identity_usage,
            response=IdentityUsageView,
            tags=ids,
        ),
        endpoint(
            "POST",
            "/plans",
            "Create a plan: settings shared by every key and identity on it",
            plan_write,
            create_plan,
            request=CreatePlanRequest,
            response=PlanView,
            status=201,
            tags=plans,
        ),
        endpoint(
            "GET",
            "/plans",
            "List plans, newest first, with cursor paging",
            plan_read,
            list_plans,
            query=PlanListQuery,
            response=PlanPage,
            tags=plans,
        ),
        endpoint(
            "GET", "/plans/{id}", "Read a plan", plan_read, get_plan, response=PlanView, tags=plans
        ),
        endpoint(
            "PATCH",
            "/plans/{id}",
            "Change a plan (bumps version; every member from its next request on)",
            plan_write,
            update_plan,
            request=UpdatePlanRequest,
            response=PlanView,
            tags=plans,
        ),
        endpoint(
            "DELETE",
            "/plans/{id}",
            "Delete a plan nothing is on (409 PLAN_IN_USE otherwise)",
            plan_write,
            delete_plan,
            response=DeletedPlan,
            tags=plans,
        ),
    )
