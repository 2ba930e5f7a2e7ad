"""``key-auth``: the API key from ``Authorization: Bearer`` or ``X-API-Key``.

The key is checked synchronously against LMDB on every request (checksum,
HMAC digest, two lookups: ~8 µs), so a key revoked or rotated through the
admin API or the CLI, from any process, is refused on the very next request.
The key never reaches the upstream; the upstream gets ``X-Key-ID`` instead
(the gateway sets it from ``ctx.consumer``, and drops any ``X-Key-ID`` a
client sends, on every route).

What a route asks of a key is a ``KeyRule``: all of ``scopes``, one of
``any_scopes``, none of the roles in ``deny_roles`` (403 ``ROLE_DENIED``),
and a key of ``keyspace`` (a key of another is refused as unknown: 401
``INVALID_KEY``). Scopes are the key's effective ones: its own (else its
plan's) plus its roles'. A disabled key, or one whose identity is disabled,
is 403 ``KEY_DISABLED``. The upstream gets the key's roles in
``X-Key-Roles`` (comma-separated), and never a client's own.

The plugin only says what to check; the gateway's services (``env.keys``,
``env.limiter``) do it. A key's credits and limits are decided in the state
of its *state key* (the first key of its rotation chain): a rotated key in
its grace and its successor spend one balance and one limiter state. Usage
is counted under the key's own id, so each key reports its own requests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from triogate.errors import MissingKey
from triogate.plugins.contract import (
    Consumer,
    Context,
    KeyRule,
    Limit,
    Plugin,
    PluginEnv,
    Response,
)

__all__ = ["KeyAuth"]

_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_STRIP = frozenset({_AUTHORIZATION, _X_API_KEY})

Scope = Annotated[str, Meta(min_length=1, max_length=100)]
RoleName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]


class KeyAuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scopes: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=100)]],
        Meta(description="scopes the key must grant (all of them); key scopes 'x:*' match 'x:...'"),
    ] = []
    any_scopes: Annotated[
        list[Scope],
        Meta(
            max_length=100,
            description="scopes of which the key must grant at least one (with scopes: both)",
        ),
    ] = []
    deny_roles: Annotated[
        list[RoleName],
        Meta(
            max_length=100,
            description="role names: a key with any of them is refused (403 ROLE_DENIED)",
        ),
    ] = []
    keyspace: Annotated[
        str | None,
        Meta(
            description="accept only keys of this keyspace ([keyspaces.NAME], or default); "
            "a key of another is 401 INVALID_KEY"
        ),
    ] = None
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
        elif name == _X_API_KEY:
            value = value.strip()
            if value:
                return value
    return None


async def _both(first: Awaitable[None], second: Awaitable[None]) -> None:
    try:
        await first
    finally:
        await second


class KeyAuth(Plugin[KeyAuthConfig]):
    name = "key-auth"
    priority = 1250
    Config = KeyAuthConfig

    def __init__(self, config: KeyAuthConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.required = tuple(config.scopes)
        self.rule = KeyRule(
            scopes=self.required,
            any_scopes=tuple(config.any_scopes),
            deny_roles=frozenset(config.deny_roles),
            keyspace=config.keyspace,
        )
        keyspace = config.keyspace
        if keyspace is not None and env.keyspaces is not None and keyspace not in env.keyspaces:
            known = ", ".join(sorted(env.keyspaces))
            raise ValueError(f"keyspace {keyspace!r} is not configured (configured: {known})")
        self.cost = config.cost
        self._hide = config.hide_credentials
        # Bound once: the hot path calls the gateway's services directly.
        # Scopes alone: the validator's check_nowait, as any validator has.
        self._plain = self.rule.plain
        self._check = env.keys.check_nowait
        # A third party's validator may predate the whole rule: it then
        # serves routes that ask scopes only.
        self._authorize: Callable[[str, KeyRule], tuple[Consumer, bool]] | None = getattr(
            env.keys, "authorize_nowait", None
        )
        if self._authorize is None and not self._plain:
            raise ValueError("the key validator decides scopes only (not any_scopes, ...)")
        self._reindex = env.keys.reindex
        self._admit = env.limiter.admit_key_nowait
        self._record = env.limiter.record_nowait
        # The gateway's limiter also counts outcomes; a third party's may not.
        self._record_outcome: Callable[[Consumer, int, str | None], None] | None = getattr(
            env.limiter, "record_outcome_nowait", None
        )

    def fuse_access(self, following: Plugin[Any]) -> bool:
        """Plan time (``triogate.dataplane.plan``): take over the access phase
        of ``following``, the plugin whose access phase runs right after
        this one, when it is ``rate-limit`` by key: the key's limits and
        credits and the route's limit are then admitted in one step, with
        the outcome of the two phases in a row. False: nothing changed."""
        route_limit = getattr(following, "key_route_limit", None)
        fused = getattr(self.env.limiter, "key_route_admission", None)
        if route_limit is None or fused is None:
            return False
        found: tuple[Limit, int] | None = route_limit()
        if found is None:
            return False
        admit = fused(*found)
        if admit is None:
            return False
        self._admit = admit
        return True

    def access_nowait(self, ctx: Context) -> Awaitable[None] | None:
        headers = ctx.request.headers
        raw_key = _extract(headers.raw)
        if raw_key is None:
            raise MissingKey("send the API key as 'Authorization: Bearer <key>' or 'X-API-Key'")
        key = raw_key.decode("latin-1")
        # Raises the refusal.
        if self._plain:
            consumer, stale = self._check(key, self.required)
        else:
            assert self._authorize is not None  # checked in __init__
            consumer, stale = self._authorize(key, self.rule)
        ctx.consumer = consumer
        # The key's own limits and credits, all-or-nothing, in the state of
        # its rotation chain.
        # A cluster node's limiter decides in Redis: an awaitable then.
        deciding = self._admit(ctx, consumer, self.cost)
        if self._hide:
            # The pairs kept as they are (no tuple rebuilt per header).
            headers.raw = [pair for pair in headers.raw if pair[0] not in _STRIP]
        if stale:
            # Found under an older HMAC secret: move it to the current one
            # (once per key after a secret rotation), the one wait here.
            reindex = self._reindex(key, consumer.id)
            return reindex if deciding is None else _both(deciding, reindex)
        return deciding

    def log_nowait(self, ctx: Context, response: Response) -> None:
        if ctx.consumer is not None:
            outcome = self._record_outcome
            if outcome is None:
                self._record(ctx.consumer, response.status)
                return
            # The problem code tells a refusal's outcome (usage history).
            problem = response.problem
            outcome(ctx.consumer, response.status, None if problem is None else problem.code)
