"""The gateway's side of the plugin API: the services ``PluginEnv`` lends.

``triogate.plugins.contract`` declares what a plugin may ask (Protocols);
this module answers with the gateway's own objects: the key service
(``KeyValidation``) and the per-key actors (``ActorLimiter``).
``plugin_env`` builds the environment the gateway hands every plugin. The
live ``Upstream`` is the request-time ``UpstreamView`` itself, and the plan's
``UpstreamBinder`` the bind-time one (``triogate.dataplane.plan``).

Key-auth and rate-limit call these on every request: each method does what
the plugins did themselves before (the same calls into the key service and
the actors, no extra object per request); plugins bind the methods once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from triogate.control.permissions import scopes_missing
from triogate.errors import (
    KEY_ERRORS,
    GatewayError,
    InsufficientScope,
    KeyVerdict,
    QuotaExceeded,
    RateLimited,
)
from triogate.plugins.contract import Consumer, Context, PluginEnv
from triogate.policy.ratelimit import Limit

if TYPE_CHECKING:
    from triogate.control.keys import KeyService
    from triogate.dataplane.actors import ActorRegistry
    from triogate.storage import KeyRecord

__all__ = ["NO_REFILL_RETRY_AFTER", "ActorLimiter", "KeyValidation", "plugin_env"]


def _refusal(
    verdict: KeyVerdict, record: KeyRecord | None, required: tuple[str, ...]
) -> GatewayError:
    """The key store's verdict as the error that refuses the request
    (``triogate.errors.KEY_ERRORS``); a scope refusal names what is missing."""
    if verdict is KeyVerdict.INSUFFICIENT_SCOPE and record is not None:
        missing = scopes_missing(record.scopes, required)
        return InsufficientScope(
            f"the key lacks the scopes {', '.join(missing)}", required_scopes=missing
        )
    cls, detail = KEY_ERRORS[verdict]
    return cls(detail)


class KeyValidation:
    """``KeyValidator`` over the key service: a synchronous read (checksum,
    HMAC digest, two LMDB lookups), so a key revoked or rotated from any
    process is refused on the very next request."""

    __slots__ = ("_validate", "reindex")

    def __init__(self, keys: KeyService) -> None:
        # The key service's own clock decides expiry and grace: one source
        # of "now" for the admin API's validate and the data plane.
        self._validate = keys.validate_nowait
        self.reindex = keys.reindex

    def __repr__(self) -> str:
        return "<KeyValidation>"

    def check_nowait(self, key: str, required_scopes: tuple[str, ...]) -> tuple[KeyRecord, bool]:
        record, verdict, stale = self._validate(key, required_scopes)
        if verdict is not None or record is None:
            raise _refusal(verdict or KeyVerdict.INVALID_KEY, record, required_scopes)
        return record, stale


NO_REFILL_RETRY_AFTER = 3600  # credits that never refill: "not soon"


def _next_refill(record: KeyRecord, refilled_at: float | None, now: float) -> int:
    """Whole seconds until the key's credits are next topped up (at least 1)."""
    spec = record.credits
    if spec is None or spec.refill_interval_seconds <= 0 or spec.refill_amount <= 0:
        return NO_REFILL_RETRY_AFTER
    since = refilled_at if refilled_at is not None else now
    return max(1, math.ceil(since + spec.refill_interval_seconds - now))


class ActorLimiter:
    """``Limiter`` over the actors: a key's state in its persisted actor
    (that of its rotation chain's first key), an address's or a route's in
    an unpersisted subject actor."""

    __slots__ = ("_actors", "_clock", "default_key_limit")

    def __init__(self, actors: ActorRegistry, default_key_limit: Limit | None = None) -> None:
        self._actors = actors
        self._clock = actors.clock
        self.default_key_limit = default_key_limit

    def __repr__(self) -> str:
        return f"<ActorLimiter {self._actors!r}>"

    def admit_key_nowait(self, ctx: Context, consumer: Consumer, cost: int) -> None:
        # Consumers are made by KeyValidation: the key records themselves.
        record: KeyRecord = consumer  # type: ignore[assignment]
        actors = self._actors
        actor = actors.actor(record.state_key)
        limits = actor.key_limits(record, self.default_key_limit)
        if not limits and record.credits is None:
            return
        now = self._clock()
        admission = actor.admit_nowait(limits, now, cost=cost, record=record, use_credits=True)
        ctx.rate_limits.extend(admission.decisions)
        if not admission.allowed:
            if admission.code == "QUOTA_EXCEEDED":
                error = QuotaExceeded("the key has no credits left", credits_remaining=0)
                error.headers["Retry-After"] = str(
                    _next_refill(record, actor.credits_refilled_at, now)
                )
                raise error
            raise RateLimited("the key's rate limit is exhausted; see Retry-After")
        clock = self._clock
        ctx.undo.append(lambda: actor.undo_nowait(admission, clock()))

    def admit_nowait(
        self, ctx: Context, subject: str, limit: Limit, cost: int, *, key: bool
    ) -> None:
        actors = self._actors
        actor = actors.actor(subject) if key else actors.subject(subject)
        admission = actor.admit_nowait((limit,), self._clock(), cost=cost)
        ctx.rate_limits.extend(admission.decisions)
        if not admission.allowed:
            raise RateLimited("the route's rate limit is exhausted; see Retry-After")
        clock = self._clock
        ctx.undo.append(lambda: actor.undo_nowait(admission, clock()))

    def record_nowait(self, consumer: Consumer, status: int) -> None:
        self._actors.actor(consumer.id).record_nowait(status, self._clock())


def plugin_env(
    *,
    keys: KeyService,
    actors: ActorRegistry,
    clock: Callable[[], float],
    default_key_limit: Limit | None = None,
) -> PluginEnv:
    """The environment the gateway hands every plugin of a config."""
    return PluginEnv(
        keys=KeyValidation(keys),
        limiter=ActorLimiter(actors, default_key_limit),
        clock=clock,
    )
