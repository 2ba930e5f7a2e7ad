"""The admin API as a table: one row per endpoint, with its permission, the
msgspec types of its query, body and answer, and a thin handler.

The table is the single description of the API: ``app.py`` turns rows into
routes (authenticating, authorising and validating from the row), and
``openapi.py`` turns the same rows and types into ``/openapi.json``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from triogate.admin.backend import AdminBackend, LoadedConfig
from triogate.admin.cluster_endpoints import NodeHealth, cluster_endpoints, health
from triogate.admin.credit_endpoints import credit_endpoints, validate_key
from triogate.admin.customer_endpoints import customer_endpoints
from triogate.admin.event_endpoints import event_endpoints
from triogate.admin.history_endpoints import history_endpoints
from triogate.admin.import_endpoints import import_endpoints
from triogate.admin.role_endpoints import role_endpoints
from triogate.control.audit import Actor
from triogate.control.models import (
    AdminList,
    AdminView,
    AuditPage,
    CleanupResult,
    CreateAdminRequest,
    CreatedAdmin,
    CreatedKey,
    CreateKeyRequest,
    KeyPage,
    KeyView,
    RevokeResult,
    RotateKeyRequest,
    RotateResult,
    SetupRequest,
    SetupResult,
    UpdateKeyRequest,
    UsageView,
    ValidateKeyRequest,
    ValidateResult,
)
from triogate.control.timeutil import utc_required
from triogate.dataplane.plugin_loader import RouteSummary
from triogate.errors import ConfigError, ValidationError

__all__ = ["ENDPOINTS", "Call", "Endpoint", "Raw"]

Limit = Annotated[int, Meta(ge=1, le=100, description="page size, 1-100")]
Cursor = Annotated[str, Meta(max_length=200, description="next_cursor of the previous page")]


class KeyListQuery(Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    cursor: Cursor | None = None
    owner: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    status: Literal["active", "revoked", "rotated", "expired"] | None = None
    identity_id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None


class AuditQuery(Struct, forbid_unknown_fields=True):
    limit: Limit = 50
    cursor: Cursor | None = None
    actor: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    action: Annotated[str, Meta(min_length=1, max_length=64)] | None = None


class ConfigVersion(Struct):
    version: str
    loaded_at: str
    source: str | None


class ConfigInfo(ConfigVersion):
    reloads: int
    history: list[ConfigVersion]  # newest first, the active one included


class RouteList(Struct):
    items: list[RouteSummary]  # the data plane's own records, encoded as they are


class BreakerView(Struct):
    state: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    window_requests: int
    window_failures: int
    open_until: float | None  # trio clock seconds; see open_seconds
    open_seconds: float
    probes_in_flight: int
    opened: int


class TargetView(Struct):
    target: str
    active: int
    idle: int
    opened: int
    healthy: bool
    breaker: BreakerView | None


class UpstreamView(Struct):
    name: str
    balance: str
    in_flight: int
    retries_in_flight: int
    targets: list[TargetView]


class UpstreamList(Struct):
    items: list[UpstreamView]


@dataclass(frozen=True)
class Call:
    """What a handler gets: validated inputs and who is calling."""

    actor: Actor
    params: dict[str, str]
    body: Any = None
    query: Any = None
    permissions: tuple[str, ...] = ()  # what the calling admin may do


@dataclass(frozen=True)
class Raw:
    """A handler's answer that is not JSON (``GET /metrics``): sent as is.
    Its endpoint says ``content_type`` so /openapi.json describes it."""

    body: bytes
    content_type: str


Handler = Callable[[AdminBackend, Call], Awaitable[Struct | Raw]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # OpenAPI template: /keys/{id}
    summary: str
    permission: str | None
    handler: Handler
    request: type[Struct] | None = None
    query: type[Struct] | None = None
    response: type[Struct] | None = None
    status: int = 200
    tags: tuple[str, ...] = field(default=())
    # The success answer's media type; anything but JSON comes back as Raw.
    content_type: str = "application/json"
    # Runs after authorisation and before the body is read: a refusal that
    # does not depend on the body costs the caller's body nothing.
    precheck: Callable[[AdminBackend], None] | None = None

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "_", self.path.lower()).strip("_")
        return f"{self.method.lower()}_{slug}"


# ---- handlers: thin; the services do the work -----------------------------


async def setup(gw: AdminBackend, call: Call) -> Struct:
    return await gw.admins.setup(call.body, call.actor.source_ip)


async def create_key(gw: AdminBackend, call: Call) -> Struct:
    return await gw.keys.create(call.body, call.actor)


async def list_keys(gw: AdminBackend, call: Call) -> Struct:
    q: KeyListQuery = call.query
    return gw.keys.list(
        limit=q.limit, cursor=q.cursor, owner=q.owner, status=q.status, identity_id=q.identity_id
    )


async def get_key(gw: AdminBackend, call: Call) -> Struct:
    return gw.keys.get(call.params["id"])


async def update_key(gw: AdminBackend, call: Call) -> Struct:
    return await gw.keys.update(call.params["id"], call.body, call.actor)


async def revoke_key(gw: AdminBackend, call: Call) -> Struct:
    return await gw.keys.revoke(call.params["id"], call.actor)


async def rotate_key(gw: AdminBackend, call: Call) -> Struct:
    return await gw.keys.rotate(call.params["id"], call.body, call.actor)


async def key_usage(gw: AdminBackend, call: Call) -> Struct:
    return gw.keys.usage(call.params["id"])


async def create_admin(gw: AdminBackend, call: Call) -> Struct:
    return await gw.admins.create(call.body, call.actor, granter=call.permissions)


async def list_admins(gw: AdminBackend, call: Call) -> Struct:
    return gw.admins.list()


async def revoke_admin(gw: AdminBackend, call: Call) -> Struct:
    return await gw.admins.revoke(call.params["id"], call.actor, revoker=call.permissions)


async def list_audit(gw: AdminBackend, call: Call) -> Struct:
    q: AuditQuery = call.query
    return gw.audit.list(limit=q.limit, cursor=q.cursor, actor=q.actor, action=q.action)


async def cleanup(gw: AdminBackend, call: Call) -> Struct:
    expired, purged = await gw.keys.cleanup(call.actor)
    return CleanupResult(expired=expired, purged=purged)


def _version(active: LoadedConfig) -> ConfigVersion:
    return ConfigVersion(
        version=active.version,
        loaded_at=msgspec.json.encode(utc_required(active.loaded_at)).decode().strip('"'),
        source=active.source,
    )


async def get_config(gw: AdminBackend, call: Call) -> Struct:
    current = _version(gw.active)
    return ConfigInfo(
        version=current.version,
        loaded_at=current.loaded_at,
        source=current.source,
        reloads=gw.configs.reloads,
        history=[_version(a) for a in reversed(gw.configs.history)],
    )


async def reload_config(gw: AdminBackend, call: Call) -> Struct:
    try:
        await gw.configs.reload(call.actor)
    except ConfigError as exc:
        raise ValidationError(exc.errors, f"the config was not reloaded: {exc.source}") from None
    return await get_config(gw, call)


async def list_routes(gw: AdminBackend, call: Call) -> Struct:
    return RouteList(gw.pipeline.describe_routes())


async def list_upstreams(gw: AdminBackend, call: Call) -> Struct:
    items = [u.statistics() for u in gw.pipeline.upstreams.values()]
    # The admin API's own view of the records (its documented schema).
    return UpstreamList([msgspec.convert(u, UpstreamView, from_attributes=True) for u in items])


async def metrics(gw: AdminBackend, call: Call) -> Raw:
    body, content_type = gw.metrics.render()
    return Raw(body, content_type)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/setup",
        "Create the first super_admin (only once)",
        None,
        setup,
        request=SetupRequest,
        response=SetupResult,
        status=201,
        tags=("admins",),
        precheck=lambda gw: gw.admins.refuse_setup_if_done(),
    ),
    Endpoint(
        "POST",
        "/keys",
        "Create an API key; the plaintext is in the answer, once",
        "admin:keys:create",
        create_key,
        request=CreateKeyRequest,
        response=CreatedKey,
        status=201,
        tags=("keys",),
    ),
    Endpoint(
        "GET",
        "/keys",
        "List keys, newest first, with cursor paging",
        "admin:keys:read",
        list_keys,
        query=KeyListQuery,
        response=KeyPage,
        tags=("keys",),
    ),
    Endpoint(
        "POST",
        "/keys/validate",
        "Check a key (and optionally scopes): its credits and limits left; spend: N spends",
        "admin:keys:read",
        validate_key,
        request=ValidateKeyRequest,
        response=ValidateResult,
        tags=("keys",),
    ),
    Endpoint(
        "GET",
        "/keys/{id}",
        "Read a key record",
        "admin:keys:read",
        get_key,
        response=KeyView,
        tags=("keys",),
    ),
    Endpoint(
        "PATCH",
        "/keys/{id}",
        "Change name, scopes, metadata, expiry, limits, credits",
        "admin:keys:update",
        update_key,
        request=UpdateKeyRequest,
        response=KeyView,
        tags=("keys",),
    ),
    Endpoint(
        "DELETE",
        "/keys/{id}",
        "Revoke a key",
        "admin:keys:revoke",
        revoke_key,
        response=RevokeResult,
        tags=("keys",),
    ),
    Endpoint(
        "POST",
        "/keys/{id}/rotate",
        "Issue a replacement; the old key works until its grace ends",
        "admin:keys:rotate",
        rotate_key,
        request=RotateKeyRequest,
        response=RotateResult,
        tags=("keys",),
    ),
    Endpoint(
        "GET",
        "/keys/{id}/usage",
        "Requests, last use, credits and limits of a key",
        "admin:keys:read",
        key_usage,
        response=UsageView,
        tags=("keys",),
    ),
    Endpoint(
        "POST",
        "/admins",
        "Create an admin with a role or explicit permissions",
        "admin:users:create",
        create_admin,
        request=CreateAdminRequest,
        response=CreatedAdmin,
        status=201,
        tags=("admins",),
    ),
    Endpoint(
        "GET",
        "/admins",
        "List admin users (never their keys)",
        "admin:users:read",
        list_admins,
        response=AdminList,
        tags=("admins",),
    ),
    Endpoint(
        "DELETE",
        "/admins/{id}",
        "Revoke an admin",
        "admin:users:revoke",
        revoke_admin,
        response=AdminView,
        tags=("admins",),
    ),
    Endpoint(
        "GET",
        "/audit",
        "The audit log, newest first",
        "admin:audit:read",
        list_audit,
        query=AuditQuery,
        response=AuditPage,
        tags=("audit",),
    ),
    Endpoint(
        "POST",
        "/maintenance/cleanup",
        "Expire keys past expiry; purge rotated keys past grace",
        "admin:system:maintenance",
        cleanup,
        response=CleanupResult,
        tags=("system",),
    ),
    Endpoint(
        "POST",
        "/config/reload",
        "Re-read the config file, validate it, swap it in atomically",
        "admin:system:maintenance",
        reload_config,
        response=ConfigInfo,
        tags=("system",),
    ),
    Endpoint(
        "GET",
        "/config",
        "The active config version and when it was loaded",
        "admin:system:read",
        get_config,
        response=ConfigInfo,
        tags=("system",),
    ),
    Endpoint(
        "GET",
        "/upstreams",
        "Upstreams and their targets: connections, health, circuit breakers",
        "admin:system:read",
        list_upstreams,
        response=UpstreamList,
        tags=("system",),
    ),
    Endpoint(
        "GET",
        "/routes",
        "Routes with their effective plugin chain, in run order",
        "admin:system:read",
        list_routes,
        response=RouteList,
        tags=("system",),
    ),
    Endpoint(
        "GET",
        "/health",
        "Liveness and readiness (and, in a cluster, this node's replica lag)",
        None,
        health,
        response=NodeHealth,
        tags=("system",),
    ),
    Endpoint(
        "GET",
        "/metrics",
        "Prometheus metrics (text exposition format 0.0.4), no key needed",
        None,
        metrics,
        content_type="text/plain",
        tags=("system",),
    ),
    *role_endpoints(Endpoint),
    *customer_endpoints(Endpoint),
    *history_endpoints(Endpoint),
    *cluster_endpoints(Endpoint),
    *credit_endpoints(Endpoint),
    *event_endpoints(Endpoint),
    *import_endpoints(Endpoint),
)
