"""The persisted schema: every record triogate writes to storage.

Records are msgspec Structs encoded as msgpack arrays (``array_like``): compact
and fast, and evolvable the msgpack way, by *appending* fields with defaults.
Never reorder or remove a field of an ``array_like`` record; add new ones at the
end with a default so that older records still decode.

Times are floats of seconds since the epoch (UTC). The API layer turns them
into RFC 3339 strings; the hot path compares them to ``now`` without parsing.

The value types (``RateLimit``, ``Credits``) carry their constraints here, once:
the admin API validates requests with the very same types.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "KEY_STATUSES",
    "AdminRecord",
    "AuditRecord",
    "Credits",
    "DeliveryAttempt",
    "DeliveryRecord",
    "IdentityRecord",
    "KeyRecord",
    "PlanRecord",
    "RateLimit",
    "RoleRecord",
    "UsageBucket",
    "UsageRecord",
    "codec",
]

KEY_STATUSES: Final = ("active", "revoked", "rotated", "expired")


class RateLimit(Struct, frozen=True, forbid_unknown_fields=True):
    """One named limit of a key, as stored: at most ``limit`` requests per
    ``period_seconds``. The config's ``RateLimitConfig`` is the configured
    kind; ``policy.ratelimit.limit_from`` turns either into a ``Limit``."""

    name: Annotated[str, Meta(min_length=1, max_length=64, description="unique per key")]
    limit: Annotated[int, Meta(ge=1, le=1_000_000_000, description="requests per period")]
    period_seconds: Annotated[
        float, Meta(gt=0, le=31_536_000, description="length of the period in seconds")
    ]
    algorithm: Annotated[
        Literal["gcra", "sliding_window"],
        Meta(description="gcra (exact, the default) or sliding_window"),
    ] = "gcra"
    # Route-bound: the limit applies only on these routes (by route name);
    # empty applies on every route (Tyk's per-API limits, Unkey's named
    # limits without autoApply).
    routes: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=128)], ...],
        Meta(max_length=64, description="route names this limit applies on; empty: all"),
    ] = ()


class Credits(Struct, frozen=True, forbid_unknown_fields=True):
    """A quota: ``remaining`` requests, topped up to ``refill_amount`` on an
    interval (seconds) or on the calendar (``policy.refill`` decides when)."""

    remaining: Annotated[int, Meta(ge=0, le=10**15, description="requests left")]
    refill_amount: Annotated[
        int, Meta(ge=0, le=10**15, description="each refill tops the balance up to this")
    ] = 0
    refill_interval_seconds: Annotated[
        float, Meta(ge=0, le=31_536_000, description="0 means never refilled")
    ] = 0
    # Issue 13: calendar refills (UTC), beside the interval in seconds (at
    # most one of the two). Daily: at 00:00 UTC; monthly: at 00:00 UTC on
    # ``refill_day`` (1-28, so every month has it; default 1).
    refill_interval: Annotated[
        Literal["daily", "monthly"] | None,
        Meta(description="daily (00:00 UTC) or monthly (on refill_day, 00:00 UTC)"),
    ] = None
    refill_day: (
        Annotated[int, Meta(ge=1, le=28, description="monthly only: the day of the month, 1-28")]
        | None
    ) = None
    # Issue 13 (events): ``credits.low`` fires when a request's spend takes
    # the balance to or below each of these percentages of its reference
    # (``refill_amount`` when the credits refill, else ``remaining`` as set).
    low_at_percent: (
        Annotated[
            tuple[Annotated[int, Meta(ge=0, le=100)], ...],
            Meta(
                max_length=8,
                description="credits.low at these percentages; none: [events] credits_low_percent",
            ),
        ]
        | None
    ) = None

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a validation error (400).
        if self.refill_interval is not None and self.refill_interval_seconds > 0:
            raise ValueError("give refill_interval or refill_interval_seconds, not both")
        if self.refill_day is not None and self.refill_interval != "monthly":
            raise ValueError("refill_day is only for refill_interval = 'monthly'")


class KeyRecord(Struct, array_like=True, frozen=True):
    """An API key. ``digest`` is HMAC-SHA256(secret[digest_version], plaintext);
    ``sealed`` is AES-GCM over the sensitive fields (owner, metadata);
    ``owner_tag`` is a keyed blind index of the owner for ``?owner=`` listing."""

    id: str
    digest: bytes
    digest_version: int
    start: str
    name: str
    sealed: bytes
    owner_tag: bytes
    owner_tag_version: int
    scopes: tuple[str, ...]
    status: str
    created_at: float
    updated_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    rotated_to: str | None = None
    rotated_from: str | None = None
    grace_ends_at: float | None = None
    rate_limits: tuple[RateLimit, ...] = ()
    credits: Credits | None = None
    # Bumped whenever credits are set (create, PATCH): a usage record whose
    # balance belongs to an older version is stale, whoever wrote it.
    credits_version: int = 0
    credits_set_at: float | None = None
    # The id of the first key of this key's rotation chain, copied by every
    # rotation; None for a key never rotated into (its own id). Credits and
    # limiter state live under that id, so an old key in its grace and its
    # successors spend one balance and one limiter state.
    state_id: str | None = None

    # Issue 12 (customers): appended, so older records decode unchanged.
    # The identity (``idn_…``) whose shared pool this key also draws from.
    identity_id: str | None = None
    # The plan (``pln_…``) whose settings apply where the key has none.
    plan_id: str | None = None
    # False: suspended (403 KEY_DISABLED), reversible, unlike revocation.
    enabled: bool = True
    # Role names (``RoleRecord.name``): their scopes add to the key's own.
    roles: tuple[str, ...] = ()
    # The keyspace (config ``[keyspaces.NAME]``) the key was made in.
    keyspace: str = "default"

    @property
    def state_key(self) -> str:
        """The id whose actor (and usage record) holds this key's credit
        balance and rate-limiter state."""
        return self.state_id or self.id


class IdentityRecord(Struct, array_like=True, frozen=True):
    """A customer behind several keys (Unkey's identity, Kong's consumer):
    its ``rate_limits`` and ``credits`` are one pool all its keys draw from.
    Its limiter state and credit balance live under its id in ``USAGE``,
    as a key's do under its ``state_key``."""

    id: str  # idn_…
    external_id: str  # the customer's id in the user's own system; unique
    name: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float
    rate_limits: tuple[RateLimit, ...] = ()
    credits: Credits | None = None
    credits_version: int = 0
    credits_set_at: float | None = None
    plan_id: str | None = None
    enabled: bool = True


class PlanRecord(Struct, array_like=True, frozen=True):
    """Settings many keys (or identities) share: what the plan says applies
    to each member where the member sets nothing of its own (field by
    field). ``version`` is bumped on every change, so a cache of effective
    settings can tell a stale plan from the live one."""

    id: str  # pln_…
    name: str
    created_at: float
    updated_at: float
    version: int = 1
    rate_limits: tuple[RateLimit, ...] = ()
    credits: Credits | None = None
    scopes: tuple[str, ...] = ()
    # Bumped when ``credits`` are set (not by other changes): the members'
    # balances that follow the plan's credits reset when it changes.
    credits_version: int = 0
    credits_set_at: float | None = None


class RoleRecord(Struct, array_like=True, frozen=True):
    """A named bundle of scopes (Unkey's roles, Kong's ACL groups). Keys
    name roles; a key's effective scopes are its own plus its roles'."""

    id: str  # rol_…
    name: str  # unique; what keys and ``deny_roles`` refer to
    scopes: tuple[str, ...]
    created_at: float
    updated_at: float
    description: str = ""


class UsageRecord(Struct, array_like=True, frozen=True):
    """Per-key usage, written by the key's actor in batches. The counters
    (requests, last use, classes) are the key's own; the credit balance and
    limiter state are kept under a rotation chain's ``KeyRecord.state_key``."""

    requests: int = 0
    last_used_at: float | None = None
    # Responses by status class: index 0 is 1xx ... index 4 is 5xx.
    by_class: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    credits_remaining: int | None = None
    credits_refilled_at: float | None = None
    credits_version: int = 0
    # GCRA state (theoretical arrival time) of the key's own limits, by name.
    limiters: dict[str, float] = {}


class AdminRecord(Struct, array_like=True, frozen=True):
    """An admin user; ``sealed`` holds the encrypted e-mail address."""

    id: str
    digest: bytes
    digest_version: int
    start: str
    name: str
    sealed: bytes
    role: str | None
    permissions: tuple[str, ...]
    status: str
    created_at: float
    revoked_at: float | None = None


class AuditRecord(Struct, array_like=True, frozen=True):
    id: str
    at: float
    actor_id: str
    action: str
    target_id: str | None
    source_ip: str | None
    details: dict[str, Any] = {}


class DeliveryAttempt(Struct, array_like=True, frozen=True):
    """One try at delivering a webhook event (``core/events``)."""

    at: float
    status: int | None  # the receiver's HTTP status; None when none came back
    error: str | None  # why it failed; None when it was delivered
    duration_ms: float = 0.0


class DeliveryRecord(Struct, array_like=True, frozen=True):
    """One event for one webhook: the delivery log's entry, and while
    ``status`` is ``pending`` the outbox's (``Table.EVENT_OUTBOX`` indexes
    it by ``next_attempt_at``). ``payload`` is the JSON body as sent."""

    id: str  # dlv_…
    event_id: str  # evt_… (one event, one delivery per subscribed webhook)
    event_type: str
    webhook: str  # the webhook's name (its url when it has none)
    url: str
    payload: bytes
    created_at: float
    status: str  # pending | delivered | failed
    next_attempt_at: float | None
    # Attempts in the current schedule (a manual retry starts a new one);
    # ``attempts`` keeps the last ones of every schedule.
    tries: int = 0
    attempts: tuple[DeliveryAttempt, ...] = ()
    key_id: str | None = None


class UsageBucket(Struct, array_like=True, frozen=True):
    """One bucket (a minute, an hour or a day) of a key's or an identity's
    usage history (``Table.USAGE_HISTORY``): requests by outcome, and by
    status class. Each request is in exactly one outcome and one class."""

    allowed: int = 0
    rate_limited: int = 0
    quota_exceeded: int = 0
    invalid: int = 0
    upstream_error: int = 0
    status_1xx: int = 0
    status_2xx: int = 0
    status_3xx: int = 0
    status_4xx: int = 0
    status_5xx: int = 0


class _Codec:
    """One reused encoder and one decoder per record type (msgspec perf tips)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self.key = msgspec.msgpack.Decoder(KeyRecord)
        self.usage = msgspec.msgpack.Decoder(UsageRecord)
        self.admin = msgspec.msgpack.Decoder(AdminRecord)
        self.audit = msgspec.msgpack.Decoder(AuditRecord)
        self.identity = msgspec.msgpack.Decoder(IdentityRecord)
        self.plan = msgspec.msgpack.Decoder(PlanRecord)
        self.role = msgspec.msgpack.Decoder(RoleRecord)
        self.usage_bucket = msgspec.msgpack.Decoder(UsageBucket)

    def encode(self, record: Struct) -> bytes:
        return self._encoder.encode(record)


codec: Final = _Codec()
