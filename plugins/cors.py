"""``cors``: Cross-Origin Resource Sharing (the Fetch standard's CORS protocol).

Preflights (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
are answered by the gateway itself, before authentication, because browsers
send them without credentials. Actual responses (also errors) get
``Access-Control-Allow-Origin`` when the origin is allowed.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.http import Headers
from triogate.plugins.contract import Context, Plugin, PluginEnv, Response

__all__ = ["Cors"]

_CORS_RESPONSE_HEADERS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
    }
)

Names = list[Annotated[str, Meta(min_length=1, max_length=200)]]


class CorsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    allow_origins: Annotated[
        Names, Meta(description="exact origins, or '*' for any (not with credentials)")
    ] = msgspec.field(default_factory=lambda: ["*"])
    allow_methods: Annotated[Names, Meta(description="methods a preflight may ask for")] = (
        msgspec.field(
            default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        )
    )
    allow_headers: Annotated[
        Names, Meta(description="request headers allowed; empty: echo what the preflight asks")
    ] = []
    expose_headers: Annotated[Names, Meta(description="response headers scripts may read")] = []
    allow_credentials: Annotated[bool, Meta(description="allow cookies/authorization")] = False
    max_age_seconds: Annotated[int, Meta(ge=0, le=86400, description="preflight cache time")] = 600


class Cors(Plugin[CorsConfig]):
    name = "cors"
    priority = 2000
    Config = CorsConfig

    def __init__(self, config: CorsConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.any_origin = "*" in config.allow_origins
        if self.any_origin and config.allow_credentials:
            raise ValueError("allow_credentials cannot be used with allow_origins = ['*']")
        self.origins = frozenset(o.encode("latin-1") for o in config.allow_origins)
        self.methods = ", ".join(m.upper() for m in config.allow_methods).encode("latin-1")
        self.allowed_methods = frozenset(m.upper().encode("latin-1") for m in config.allow_methods)
        self.headers = ", ".join(config.allow_headers).encode("latin-1")
        self.expose = ", ".join(config.expose_headers).encode("latin-1")

    def _allow_origin(self, origin: bytes) -> bytes | None:
        if self.any_origin:
            return b"*"
        return origin if origin in self.origins else None

    def access_nowait(self, ctx: Context) -> Response | None:
        request = ctx.request
        if request.method != "OPTIONS":
            return None
        origin = request.headers.get_raw(b"origin")
        wanted = request.headers.get_raw(b"access-control-request-method")
        if origin is None or wanted is None:
            return None  # a plain OPTIONS: the upstream answers it
        raw: list[tuple[bytes, bytes]] = [(b"vary", b"Origin")]
        allowed = self._allow_origin(origin)
        if allowed is not None and wanted.upper() in self.allowed_methods:
            raw.append((b"access-control-allow-origin", allowed))
            raw.append((b"access-control-allow-methods", self.methods))
            asked = request.headers.get_raw(b"access-control-request-headers")
            headers = self.headers or asked
            if headers:
                raw.append((b"access-control-allow-headers", headers))
            if self.config.allow_credentials:
                raw.append((b"access-control-allow-credentials", b"true"))
            raw.append((b"access-control-max-age", str(self.config.max_age_seconds).encode()))
        ctx.state["cors_preflight"] = True
        return Response(204, Headers(raw), content=b"")

    def response_nowait(self, ctx: Context, response: Response) -> None:
        origin = ctx.request.headers.get_raw(b"origin")
        if origin is None:
            return  # not a CORS request (checked first: most requests stop here)
        if ctx.state.get("cors_preflight"):
            return
        allowed = self._allow_origin(origin)
        if allowed is None:
            return
        headers = response.headers
        # Ours replace the upstream's: two Allow-Origin values break browsers.
        headers.raw = raw = [(k, v) for k, v in headers.raw if k not in _CORS_RESPONSE_HEADERS]
        raw.append((b"access-control-allow-origin", allowed))
        if not self.any_origin:
            raw.append((b"vary", b"Origin"))
        if self.config.allow_credentials:
            raw.append((b"access-control-allow-credentials", b"true"))
        if self.expose:
            raw.append((b"access-control-expose-headers", self.expose))
