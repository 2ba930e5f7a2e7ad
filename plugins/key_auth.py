"""``key-auth``: the API key from ``Authorization: Bearer`` or ``X-API-Key``.

The key is checked synchronously against LMDB on every request (checksum,
HMAC digest, two lookups: ~8 µs), so a key revoked or rotated through the
admin API or the CLI, from any process, is refused on the very next request.
The key never reaches the upstream; the upstream gets ``X-Key-ID`` instead
(the gateway sets it from ``ctx.consumer``, and drops any ``X-Key-ID`` a
client sends, on every route).

A key's credits and limits are decided in the actor of its *state key* (the
first key of its rotation chain): a rotated key in its grace and its
successor spend one balance and one limiter state. Usage is counted in the
key's own actor, so each key reports its own requests.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.control.permissions import scopes_missing
from triogate.dataplane.actors import QuotaExceeded, RateLimited
from triogate.errors import KEY_ERRORS, InsufficientScope, MissingKey
from triogate.plugins.contract import Context, Plugin, PluginEnv, Response
from triogate.storage import KeyRecord

__all__ = ["KeyAuth"]

_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_STRIP = frozenset({_AUTHORIZATION, _X_API_KEY})
_DETAILS = {
    "INVALID_KEY": "the API key is malformed or unknown",
    "KEY_REVOKED": "the API key has been revoked",
    "KEY_EXPIRED": "the API key has expired",
    "KEY_ROTATED": "the API key was rotated and its grace period is over",
}


class KeyAuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scopes: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=100)]],
        Meta(description="scopes the key must grant (all of them); key scopes 'x:*' match 'x:...'"),
    ] = []
    hide_credentials: Annotated[
        bool, Meta(description="remove the key headers before the request goes upstream")
    ] = True
    cost: Annotated[
        int, Meta(ge=0, le=1_000_000, description="credits a request on this route costs")
    ] = 1


def _extract(raw: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in raw:
        if name == _AUTHORIZATION:
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == _X_API_KEY and value.strip():
            return value.strip()
    return None


NO_REFILL_RETRY_AFTER = 3600  # credits that never refill: "not soon"


def _next_refill(record: KeyRecord, refilled_at: float | None, now: float) -> int:
    """Whole seconds until the key's credits are next topped up (at least 1)."""
    spec = record.credits
    if spec is None or spec.refill_interval_seconds <= 0 or spec.refill_amount <= 0:
        return NO_REFILL_RETRY_AFTER
    since = refilled_at if refilled_at is not None else now
    return max(1, math.ceil(since + spec.refill_interval_seconds - now))


class KeyAuth(Plugin[KeyAuthConfig]):
    name = "key-auth"
    priority = 1250
    Config = KeyAuthConfig

    def __init__(self, config: KeyAuthConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.required = tuple(config.scopes)

    async def access(self, ctx: Context) -> Response | None:
        headers = ctx.request.headers
        raw_key = _extract(headers.raw)
        if raw_key is None:
            raise MissingKey("send the API key as 'Authorization: Bearer <key>' or 'X-API-Key'")
        key = raw_key.decode("latin-1")
        keys = self.env.keys
        assert keys is not None, "key-auth runs with the gateway's key service"
        record, code, stale = keys.validate_nowait(key, self.required)
        if code is not None:
            if code == "INSUFFICIENT_SCOPE" and record is not None:
                missing = scopes_missing(record.scopes, self.required)
                raise InsufficientScope(
                    f"the key lacks the scopes {', '.join(missing)}", required_scopes=missing
                )
            raise KEY_ERRORS[code](_DETAILS.get(code))
        assert record is not None
        if stale:
            # Found under an older HMAC secret: move it to the current one
            # (once per key after a secret rotation).
            await keys.reindex(key, record.id)
        ctx.consumer = record
        self._admit(ctx, record)
        if self.config.hide_credentials:
            headers.raw = [(k, v) for k, v in headers.raw if k not in _STRIP]
        return None

    def _admit(self, ctx: Context, record: KeyRecord) -> None:
        """The key's own limits and credits, all-or-nothing, in the actor of
        its state key (shared with the rest of its rotation chain)."""
        actors = self.env.actors
        if actors is None:
            return
        actor = actors.actor(record.state_key)
        limits = actor.key_limits(record, self.env.default_key_limit)
        if not limits and record.credits is None:
            return
        now = actors.clock()
        admission = actor.admit_nowait(
            limits, now, cost=self.config.cost, record=record, use_credits=True
        )
        ctx.rate_limits.extend(admission.decisions)
        if not admission.allowed:
            if admission.code == "QUOTA_EXCEEDED":
                error = QuotaExceeded("the key has no credits left", credits_remaining=0)
                error.headers["Retry-After"] = str(
                    _next_refill(record, actor.credits_refilled_at, now)
                )
                raise error
            raise RateLimited("the key's rate limit is exhausted; see Retry-After")
        ctx.undo.append(lambda: actor.undo_nowait(admission, actors.clock()))

    async def log(self, ctx: Context, response: Response) -> None:
        actors = self.env.actors
        if actors is not None and ctx.consumer is not None:
            actors.actor(ctx.consumer.id).record_nowait(response.status, actors.clock())
