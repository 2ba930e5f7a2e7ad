"""``request-id``: echo the request id to the client.

The gateway always gives a request an id (the client's ``X-Request-ID`` if it
is a sane token, else a new one: a random prefix per process and a counter)
and forwards it upstream; problem bodies carry it as ``request_id``. This
plugin also returns it in a response header, so a client can quote it in a
support ticket.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from triogate.plugins.contract import Context, Plugin, PluginEnv, Response

__all__ = ["RequestId"]


class RequestIdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    header_name: Annotated[
        str,
        Meta(pattern=r"^[A-Za-z0-9-]{1,64}$", description="response header carrying the id"),
    ] = "X-Request-ID"


class RequestId(Plugin[RequestIdConfig]):
    name = "request-id"
    priority = 100_000
    Config = RequestIdConfig

    def __init__(self, config: RequestIdConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        self.header = config.header_name.lower().encode("ascii")

    def response_nowait(self, ctx: Context, response: Response) -> None:
        response.headers.remove_raw(self.header)
        response.headers.raw.append((self.header, ctx.request_id.encode("ascii")))
