"""The admin API's request and response types for identities and plans
(``/identities``, ``/plans``): like ``models``, the single source of truth
for the wire format and for ``/openapi.json``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from msgspec import UNSET, Meta, Struct, UnsetType

from triogate.control.effective import EffectivePool
from triogate.control.models import (
    CreditsSpec,
    Metadata,
    Name,
    PlanId,
    RateLimits,
    Scopes,
)
from triogate.storage import Credits, RateLimit

__all__ = [
    "CreateIdentityRequest",
    "CreatePlanRequest",
    "DeletedIdentity",
    "DeletedPlan",
    "IdentityPage",
    "IdentityUsageView",
    "IdentityView",
    "PlanPage",
    "PlanView",
    "UpdateIdentityRequest",
    "UpdatePlanRequest",
]

ExternalId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=256,
        description="the customer's id in your own system; unique",
    ),
]
IdentityName = Annotated[str, Meta(max_length=255, description="0-255 characters")]


# ---- identities ------------------------------------------------------------


class CreateIdentityRequest(Struct, forbid_unknown_fields=True):
    external_id: ExternalId
    name: IdentityName = ""
    metadata: Metadata | None = None
    rate_limits: RateLimits = []
    credits: CreditsSpec | None = None
    plan_id: PlanId | None = None
    enabled: bool = True


class UpdateIdentityRequest(Struct, forbid_unknown_fields=True):
    """PATCH: absent fields stay as they are; ``null`` clears a nullable one."""

    external_id: ExternalId | UnsetType = UNSET
    name: IdentityName | UnsetType = UNSET
    metadata: Metadata | UnsetType | None = UNSET
    rate_limits: RateLimits | UnsetType = UNSET
    credits: CreditsSpec | UnsetType | None = UNSET
    plan_id: PlanId | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET


class IdentityView(Struct):
    id: str
    external_id: str
    name: str
    metadata: dict[str, Any]
    rate_limits: list[RateLimit]
    credits: Credits | None  # with the pool's balance being spent
    plan_id: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    # The pool in force after the plan (docs/identities.md).
    effective: EffectivePool


class IdentityPage(Struct):
    items: list[IdentityView]
    next_cursor: str | None


class IdentityUsageView(Struct):
    identity_id: str
    keys: int  # keys naming the identity (any status)
    requests: int  # the sum of its keys' requests
    last_used_at: datetime | None
    by_status_class: dict[str, int]
    credits_remaining: int | None  # the shared pool's balance
    rate_limits: list[RateLimit]  # the shared pool's limits


class DeletedIdentity(Struct):
    id: str
    deleted: bool
    revoked_keys: list[str]


# ---- plans -----------------------------------------------------------------


class CreatePlanRequest(Struct, forbid_unknown_fields=True):
    name: Name
    rate_limits: RateLimits = []
    credits: CreditsSpec | None = None
    scopes: Scopes = []


class UpdatePlanRequest(Struct, forbid_unknown_fields=True):
    name: Name | UnsetType = UNSET
    rate_limits: RateLimits | UnsetType = UNSET
    credits: CreditsSpec | UnsetType | None = UNSET
    scopes: Scopes | UnsetType = UNSET


class PlanView(Struct):
    id: str
    name: str
    version: int  # bumped on every change
    rate_limits: list[RateLimit]
    credits: Credits | None
    scopes: list[str]
    created_at: datetime
    updated_at: datetime


class PlanPage(Struct):
    items: list[PlanView]
    next_cursor: str | None


class DeletedPlan(Struct):
    id: str
    deleted: bool
