"""``key-auth``: the API key from ``Authorization: Bearer`` or ``X-API-Key``.

The key is checked synchronously against LMDB on every request (checksum,
HMAC digest, two lookups: ~8 µs), so a key revoked or rotated through the
admin API or the CLI, from any process, is refused on the very next request.
The key never reaches the upstream; the upstream gets ``X-Key-ID`` instead
(the gateway sets it from ``ctx.consumer``, and drops any ``X-Key-ID`` a
client sends, on every route).

The plugin only says what to check; the gateway's services (``env.keys``,
``env.limiter``) do it. A key's credits and limits are decided in the state
of its *state key* (the first key of its rotation chain): a rotated key in
its grace and its successor spend one balance and one limiter state. Usage
is counted under the key's own id, so each key reports its own requests.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.errors import MissingKey
from triogate.plugins.contract import Context, Plugin, PluginEnv, Response

__all__ = ["KeyAuth"]

_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_STRIP = frozenset({_AUTHORIZATION, _X_API_KEY})


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


class KeyAuth(Plugin[KeyAuthConfig]):
    name = "key-auth"
    priority = 1250
    Config = KeyAuthConfig

    def __init__(self, config: KeyAuthConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.required = tuple(config.scopes)
        self.cost = config.cost
        # Bound once: the hot path calls the gateway's services directly.
        self._check = env.keys.check_nowait
        self._reindex = env.keys.reindex
        self._admit = env.limiter.admit_key_nowait
        self._record = env.limiter.record_nowait

    async def access(self, ctx: Context) -> Response | None:
        headers = ctx.request.headers
        raw_key = _extract(headers.raw)
        if raw_key is None:
            raise MissingKey("send the API key as 'Authorization: Bearer <key>' or 'X-API-Key'")
        key = raw_key.decode("latin-1")
        consumer, stale = self._check(key, self.required)  # raises the refusal
        if stale:
            # Found under an older HMAC secret: move it to the current one
            # (once per key after a secret rotation).
            await self._reindex(key, consumer.id)
        ctx.consumer = consumer
        # The key's own limits and credits, all-or-nothing, in the state of
        # its rotation chain.
        self._admit(ctx, consumer, self.cost)
        if self.config.hide_credentials:
            headers.raw = [(k, v) for k, v in headers.raw if k not in _STRIP]
        return None

    async def log(self, ctx: Context, response: Response) -> None:
        if ctx.consumer is not None:
            self._record(ctx.consumer, response.status)
