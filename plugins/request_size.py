"""``request-size-limiting``: a per-route cap on the request body, below the
server-wide ``max_request_body_bytes``. A declared length over the cap is
refused before a byte of the body is read; a chunked body is counted as it
streams and cut off at the cap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.errors import LengthRequired, PayloadTooLarge
from triogate.http import Body
from triogate.plugins.contract import Context, Plugin, PluginEnv, Response

__all__ = ["RequestSizeLimiting"]


class RequestSizeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    allowed_payload_bytes: Annotated[
        int, Meta(ge=0, le=1 << 40, description="largest body accepted")
    ]
    require_content_length: Annotated[
        bool, Meta(description="refuse chunked bodies (411) instead of counting them")
    ] = False


class RequestSizeLimiting(Plugin[RequestSizeConfig]):
    name = "request-size-limiting"
    priority = 1500
    Config = RequestSizeConfig

    def __init__(self, config: RequestSizeConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.limit = config.allowed_payload_bytes

    def access_nowait(self, ctx: Context) -> Response | None:
        body = ctx.request.body
        if body.length is not None:
            if body.length > self.limit:
                raise PayloadTooLarge(f"the request body is limited to {self.limit} bytes here")
            return None
        if self.config.require_content_length:
            raise LengthRequired("this route needs a Content-Length")
        ctx.request.body = Body(self._counted(body), None)
        return None

    async def _counted(self, body: Body) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in body:
            seen += len(chunk)
            if seen > self.limit:
                raise PayloadTooLarge(f"the request body is limited to {self.limit} bytes here")
            yield chunk
