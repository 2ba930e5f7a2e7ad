"""The admin API's request and response types.

These Structs are the single source of truth for the wire format: the admin
app validates request bodies with them (``validation.convert_all``) and
``/openapi.json`` is generated from them (msgspec emits JSON Schema), so the
documentation cannot drift from what is enforced.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from triogate.control.effective import EffectiveKey
from triogate.storage import Credits, RateLimit
from triogate.validation import Rule

__all__ = [
    "MAX_METADATA_BYTES",
    "AdminList",
    "AdminView",
    "AuditPage",
    "AuditView",
    "CleanupResult",
    "CreateAdminRequest",
    "CreateKeyRequest",
    "CreatedAdmin",
    "CreatedKey",
    "Health",
    "KeyPage",
    "KeyView",
    "LimitStateView",
    "Problem",
    "RevokeResult",
    "RotateKeyRequest",
    "RotateResult",
    "RotatedOld",
    "SetupRequest",
    "SetupResult",
    "UpdateKeyRequest",
    "UsageView",
    "ValidateKeyRequest",
    "ValidateResult",
]

MAX_METADATA_BYTES = 8192
MIN_PERIOD_SECONDS = 0.001
MIN_REFILL_SECONDS = 1
MAX_GRACE_SECONDS = 30 * 86400
DEFAULT_GRACE_SECONDS = 86400

Name = Annotated[str, Meta(min_length=1, max_length=255, description="1-255 characters")]
Owner = Annotated[
    str,
    Meta(min_length=1, max_length=255, description="who the key belongs to (encrypted at rest)"),
]
Scope = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=100,
        pattern=r"^[\x21-\x7e]+$",
        description="case-sensitive; a trailing ':*' grants every scope with that prefix",
    ),
]
Scopes = Annotated[list[Scope], Meta(max_length=50, description="at most 50 scopes")]
Email = Annotated[str, Meta(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")]


def _sane_time(value: datetime) -> str | None:
    try:
        year = value.astimezone(UTC).year
    except (OverflowError, ValueError):
        return "out of range"
    return None if 1970 <= year <= 9998 else "must be between 1970 and 9998"


def _metadata_size(metadata: dict[str, Any]) -> str | None:
    if len(msgspec.json.encode(metadata)) > MAX_METADATA_BYTES:
        return f"must encode to at most {MAX_METADATA_BYTES} bytes of JSON"
    return None


def _unique_names(limits: list[RateLimit]) -> str | None:
    names = [r.name for r in limits]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    return f"duplicate names: {', '.join(duplicates)}" if duplicates else None


def _period(limit: RateLimit) -> str | None:
    # Storage accepts any positive period (records written before this bound
    # must still decode); new ones are held to what a limiter can count.
    if limit.period_seconds < MIN_PERIOD_SECONDS:
        return f"must be at least {MIN_PERIOD_SECONDS} (a millisecond)"
    return None


def _refill_interval(credits: Credits) -> str | None:
    interval = credits.refill_interval_seconds
    if 0 < interval < MIN_REFILL_SECONDS:
        return f"must be 0 (never refilled) or at least {MIN_REFILL_SECONDS} second"
    return None


def _in_future(value: datetime) -> str | None:
    # The services check again against their own (injectable) clock; this
    # one lets the error be listed together with every other field's.
    return None if value.timestamp() > time.time() else "must be in the future"


Timestamp = Annotated[
    datetime, Meta(tz=True, description="RFC 3339 with a timezone"), Rule(_sane_time)
]
Expiry = Annotated[Timestamp, Meta(description="when the key stops working"), Rule(_in_future)]
Metadata = Annotated[
    dict[str, Any],
    Meta(max_length=64, description=f"free-form JSON object, at most {MAX_METADATA_BYTES} bytes"),
    Rule(_metadata_size),
]
LimitSpec = Annotated[
    RateLimit,
    Meta(description="period_seconds: 0.001 to 31536000; limit: 1 to 10^9"),
    Rule(_period, at="period_seconds"),
]
CreditsSpec = Annotated[
    Credits,
    Meta(description="refill_interval_seconds: 0 (never) or 1 to 31536000"),
    Rule(_refill_interval, at="refill_interval_seconds"),
]
RateLimits = Annotated[
    list[LimitSpec],
    Meta(max_length=10, description="checked all-or-nothing; names unique"),
    Rule(_unique_names),
]
Role = Literal["super_admin", "key_admin", "key_viewer", "auditor"]
Permission = Annotated[
    str,
    Meta(pattern=r"^(\*|admin:\*|admin:[a-z]+:(\*|[a-z]+))$", description="e.g. admin:keys:read"),
]
KeyStatus = Literal["active", "revoked", "rotated", "expired"]
IdentityId = Annotated[str, Meta(min_length=1, max_length=64, description="an identity id (idn_…)")]
PlanId = Annotated[str, Meta(min_length=1, max_length=64, description="a plan id (pln_…)")]
RoleName = Annotated[
    str, Meta(min_length=1, max_length=64, description="a role's name (POST /roles)")
]
RoleNames = Annotated[
    list[RoleName], Meta(max_length=50, description="role names; each must exist")
]
KeyspaceName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        description="a keyspace of the config ([keyspaces.NAME]); default: default",
    ),
]


# ---- requests -------------------------------------------------------------


class CreateKeyRequest(Struct, forbid_unknown_fields=True):
    name: Name
    owner: Owner
    scopes: Scopes = []
    expires_at: Expiry | None = None
    metadata: Metadata | None = None
    rate_limits: RateLimits = []
    credits: CreditsSpec | None = None
    identity_id: IdentityId | None = None
    plan_id: PlanId | None = None
    enabled: bool = True
    roles: RoleNames = []
    keyspace: KeyspaceName = "default"


class UpdateKeyRequest(Struct, forbid_unknown_fields=True):
    """PATCH: absent fields stay as they are; ``null`` clears a nullable one."""

    name: Name | UnsetType = UNSET
    scopes: Scopes | UnsetType = UNSET
    metadata: Metadata | UnsetType | None = UNSET
    expires_at: Expiry | UnsetType | None = UNSET
    rate_limits: RateLimits | UnsetType = UNSET
    credits: CreditsSpec | UnsetType | None = UNSET
    identity_id: IdentityId | UnsetType | None = UNSET
    plan_id: PlanId | UnsetType | None = UNSET
    enabled: bool | UnsetType = UNSET
    roles: RoleNames | UnsetType = UNSET


class RotateKeyRequest(Struct, forbid_unknown_fields=True):
    grace_seconds: Annotated[
        int,
        Meta(
            ge=0,
            le=MAX_GRACE_SECONDS,
            description="how long the old key keeps working (default one day)",
        ),
    ] = DEFAULT_GRACE_SECONDS


class ValidateKeyRequest(Struct, forbid_unknown_fields=True):
    key: Annotated[str, Meta(min_length=1, max_length=512)]
    scopes: Scopes = []
    spend: Annotated[
        int,
        Meta(
            ge=0,
            le=1_000_000,
            description="credits to spend, admitted against the limits like a request; "
            "0 (the default) only reports the state",
        ),
    ] = 0


class SetupRequest(Struct, forbid_unknown_fields=True):
    name: Name
    email: Email


class CreateAdminRequest(Struct, forbid_unknown_fields=True):
    name: Name
    email: Email
    role: Role | None = None
    permissions: Annotated[list[Permission], Meta(max_length=32)] | None = None

    def __post_init__(self) -> None:
        if (self.role is None) == (self.permissions is None):
            raise ValueError("give exactly one of role or permissions")


# ---- responses ------------------------------------------------------------


class KeyView(Struct):
    id: str
    name: str
    owner: str
    start: str
    scopes: list[str]
    status: KeyStatus
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_to: str | None
    rotated_from: str | None
    grace_ends_at: datetime | None
    last_used_at: datetime | None
    metadata: dict[str, Any] | None
    rate_limits: list[RateLimit]
    credits: Credits | None
    identity_id: str | None
    plan_id: str | None
    enabled: bool
    roles: list[str]
    keyspace: str
    # The settings in force after the plan and roles (docs/identities.md).
    effective: EffectiveKey


class CreatedKey(KeyView):
    key: str  # the plaintext: shown once, never stored


class KeyPage(Struct):
    items: list[KeyView]
    next_cursor: str | None


class RevokeResult(Struct):
    id: str
    status: KeyStatus
    revoked_at: datetime


class RotatedOld(Struct):
    id: str
    status: KeyStatus
    grace_ends_at: datetime


class RotateResult(Struct):
    old: RotatedOld
    new: CreatedKey


class ValidateResult(Struct, omit_defaults=True):
    valid: bool
    code: str | None = None
    key_id: str | None = None
    owner: str | None = None
    scopes: list[str] | None = None
    expires_at: datetime | None = None
    grace_ends_at: datetime | None = None
    required_scopes: list[str] | None = None
    # Issue 13: the key's limit state (``control.credits``); absent when
    # the key is refused, and credits_remaining for a key without credits.
    credits_remaining: int | None = None
    rate_limits: list[LimitStateView] | None = None


class LimitStateView(Struct):
    """One of a key's effective limits as ``POST /keys/validate`` reports it:
    how many more requests it allows now, and in how many seconds it is whole."""

    name: str
    limit: int
    remaining: int
    reset_seconds: int


class UsageView(Struct):
    key_id: str
    requests: int
    last_used_at: datetime | None
    by_status_class: dict[str, int]
    credits_remaining: int | None
    rate_limits: list[RateLimit]


class AdminView(Struct):
    id: str
    name: str
    email: str
    start: str
    role: Role | None
    permissions: list[str]
    status: Literal["active", "revoked"]
    created_at: datetime
    revoked_at: datetime | None


class CreatedAdmin(AdminView):
    key: str


class SetupResult(Struct):
    id: str
    key: str
    role: Role
    name: str
    email: str


class AdminList(Struct):
    items: list[AdminView]


class AuditView(Struct):
    id: str
    at: datetime
    actor_id: str
    action: str
    target_id: str | None
    source_ip: str | None
    details: dict[str, Any]


class AuditPage(Struct):
    items: list[AuditView]
    next_cursor: str | None


class CleanupResult(Struct):
    expired: int
    purged: int


class Health(Struct):
    status: str
    version: str


class FieldErrorView(Struct):
    path: str
    message: str


class Problem(Struct, omit_defaults=True):
    """RFC 9457 problem details, as every gateway error is answered."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None
    errors: list[FieldErrorView] | None = None
    required_scopes: list[str] | None = None
    required_permission: str | None = None
