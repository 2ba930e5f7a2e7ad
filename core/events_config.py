"""``[events]`` and ``[[events.webhooks]]``: the config types of events and
webhooks (``triogate.events``), in their own module so ``config`` stays
readable; ``triogate.config`` re-exports them. Like ``config``, this is the
shared base: it imports no layer.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from triogate.errors import FieldError

__all__ = ["MAX_WEBHOOKS", "EventType", "EventsConfig", "WebhookConfig", "webhook_checks"]

Identifier = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
PositiveSeconds = Annotated[float, Meta(ge=0.001, le=86400)]

EventType = Literal[
    "key.created",
    "key.updated",
    "key.revoked",
    "key.rotated",
    "key.expired",
    "key.disabled",
    "credits.low",
    "rate_limit.exceeded",
]
MAX_WEBHOOKS = 16


class WebhookConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """``[[events.webhooks]]``: where events are POSTed, signed (``core/events``)."""

    url: Annotated[
        str,
        Meta(
            pattern=r"^https?://[^/\s?#]+(/[^\s#]*)?$",
            max_length=2048,
            description="http:// or https:// URL the events are POSTed to",
        ),
    ]
    events: Annotated[
        list[EventType], Meta(min_length=1, max_length=8, description="the event types sent here")
    ]
    secret: Annotated[
        str,
        Meta(
            min_length=32,
            max_length=512,
            description="the HMAC-SHA256 signing secret, at least 32 characters",
        ),
    ]
    name: Annotated[Identifier, Meta(description="names it in the delivery log (default: url)")] | (
        None
    ) = None

    @property
    def label(self) -> str:
        """What the delivery log calls this webhook."""
        return self.name or self.url


class EventsConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """``[events]``: webhooks, and how their deliveries are retried."""

    webhooks: Annotated[list[WebhookConfig], Meta(max_length=MAX_WEBHOOKS)] = []
    credits_low_percent: Annotated[
        list[Annotated[int, Meta(ge=0, le=100)]],
        Meta(max_length=8, description="credits.low thresholds, % of the balance's reference"),
    ] = msgspec.field(default_factory=lambda: [20, 0])
    timeout_seconds: Annotated[
        float, Meta(ge=0.01, le=60, description="one delivery attempt's time limit")
    ] = 10.0
    max_attempts: Annotated[int, Meta(ge=1, le=30, description="attempts before failed")] = 15
    retry_base_seconds: Annotated[
        PositiveSeconds, Meta(description="the first retry's delay; doubled after each")
    ] = 30.0
    retry_max_seconds: Annotated[PositiveSeconds, Meta(description="the longest retry delay")] = (
        14_400.0
    )
    retention_days: Annotated[
        int, Meta(ge=1, le=365, description="delivered and failed deliveries are kept this long")
    ] = 30


def webhook_checks(events: EventsConfig) -> list[FieldError]:
    """Webhook names (or urls) unique: the delivery log tells them apart."""
    errors: list[FieldError] = []
    seen: dict[str, int] = {}
    for i, hook in enumerate(events.webhooks):
        if hook.label in seen:
            errors.append(
                FieldError(
                    f"events.webhooks[{i}].name",
                    f"{hook.label!r} is also events.webhooks[{seen[hook.label]}]'s: "
                    "give each webhook its own name",
                )
            )
        seen.setdefault(hook.label, i)
    if events.retry_max_seconds < events.retry_base_seconds:
        errors.append(FieldError("events.retry_max_seconds", "must be at least retry_base_seconds"))
    return errors
