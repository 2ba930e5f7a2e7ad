"""Testing one phase at a time, without a server: ``make_context`` makes the
``Context`` the pipeline would, ``PluginEnv()`` stands in for the gateway."""

from __future__ import annotations

import pytest
from triogate_header_stamp import HeaderStamp, MissingHeader

from triogate.http import Response
from triogate.plugins import PluginEnv
from triogate.testing import make_context, route_view


async def test_refuses_without_the_header() -> None:
    plugin = HeaderStamp(HeaderStamp.Config(require_header="X-Tenant"), PluginEnv())
    with pytest.raises(MissingHeader):
        await plugin.access(make_context("GET", "/orders"))
    assert await plugin.access(make_context(headers=[("x-tenant", "a")])) is None


async def test_stamps_the_route_and_no_key() -> None:
    plugin = HeaderStamp(HeaderStamp.Config(), PluginEnv())
    response = Response(200)
    await plugin.response(make_context(route=route_view("orders")), response)
    assert response.headers.get("x-gateway-stamp") == "route=orders; key=-"
