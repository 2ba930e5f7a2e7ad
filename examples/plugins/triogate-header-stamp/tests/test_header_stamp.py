"""Testing a plugin: a fake upstream, the real gateway in front of it, a few
lines per test (``triogate.testing``; every ``async def`` test runs under trio).

These tests hand the class over with ``extra_plugins``, which is how a plugin
is tested before it is installed; test_header_stamp_entry_point.py checks the
installed entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from triogate_header_stamp import HeaderStamp

from triogate.plugins import PluginEnv
from triogate.testing import FakeResponse, FakeUpstream, PluginLoadError, build_chain, open_harness

PLUGINS = [HeaderStamp]


async def test_stamps_the_route_and_the_key_id(tmp_path: Path) -> None:
    plugins: dict[str, dict[str, Any]] = {"key-auth": {}, "header-stamp": {}}
    async with open_harness(tmp_path, plugins=plugins, extra_plugins=PLUGINS) as h:
        key = await h.create_key()
        r = await h.client.get("/orders/1", headers={"X-API-Key": key})
        assert r.status_code == 200
        key_id = h.upstream.requests[0].header("x-key-id")  # what key-auth sent upstream
        assert key_id is not None and key_id.startswith("key_")
        assert r.headers["x-gateway-stamp"] == f"route=test; key={key_id}"


async def test_custom_header_template_and_anonymous(tmp_path: Path) -> None:
    stamp = {"header_name": "X-Trace", "value": "{route}/{key_id}/{request_id}", "anonymous": "?"}
    upstream = FakeUpstream([FakeResponse(503, body=b"down")])
    async with open_harness(
        tmp_path, upstream=upstream, plugins={"header-stamp": stamp}, extra_plugins=PLUGINS
    ) as h:
        r = await h.client.get("/orders", headers={"X-Request-ID": "req-1"})
        assert r.status_code == 503  # the upstream's own answer, stamped
        assert r.headers["x-trace"] == "test/?/req-1"
        assert "x-gateway-stamp" not in r.headers


async def test_errors_are_stamped_too(tmp_path: Path) -> None:
    plugins: dict[str, dict[str, Any]] = {"key-auth": {}, "header-stamp": {}}
    async with open_harness(tmp_path, plugins=plugins, extra_plugins=PLUGINS) as h:
        r = await h.client.get("/orders")  # no key: key-auth refuses in its access phase
        assert r.status_code == 401
        assert r.json()["code"] == "MISSING_KEY"
        assert r.headers["x-gateway-stamp"] == "route=test; key=-"
        assert h.upstream.requests == []


async def test_require_header(tmp_path: Path) -> None:
    plugins = {"header-stamp": {"require_header": "X-Tenant"}}
    async with open_harness(tmp_path, plugins=plugins, extra_plugins=PLUGINS) as h:
        r = await h.client.get("/orders")
        assert r.status_code == 400
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "MISSING_HEADER"
        assert h.upstream.requests == []  # refused in access: never sent upstream
        r = await h.client.get("/orders", headers={"X-Tenant": "acme"})
        assert r.status_code == 200
        assert h.upstream.requests[0].header("x-tenant") == "acme"


@pytest.mark.parametrize(
    ("order", "status"),
    [
        ({}, 401),  # by priority: key-auth (1250) runs before header-stamp (850)
        ({"before": ["key-auth"]}, 400),  # moved: the header is checked first
    ],
)
async def test_before_key_auth(tmp_path: Path, order: dict[str, Any], status: int) -> None:
    plugins = {"key-auth": {}, "header-stamp": {"require_header": "X-Tenant", **order}}
    async with open_harness(tmp_path, plugins=plugins, extra_plugins=PLUGINS) as h:
        r = await h.client.get("/orders")  # neither a key nor X-Tenant
        assert r.status_code == status


def test_a_bad_template_stops_start_up() -> None:
    # The same check the gateway runs at start-up and on a config reload.
    registry = {"header-stamp": HeaderStamp}
    route = {"header-stamp": {"value": "{route} {user}"}}
    with pytest.raises(PluginLoadError) as info:
        build_chain(registry, {}, route, PluginEnv(), route_path="routes[0]")
    assert info.value.lines() == [
        "routes[0].plugins.header-stamp: plugin 'header-stamp' refused its settings: "
        "value: unknown placeholder {user} (use {route}, {key_id}, {request_id})"
    ]


def test_settings_are_validated_with_their_paths() -> None:
    registry = {"header-stamp": HeaderStamp}
    route = {"header-stamp": {"header_name": "no spaces", "colour": "red"}}
    with pytest.raises(PluginLoadError) as info:
        build_chain(registry, {}, route, PluginEnv(), route_path="routes[2]")
    lines = info.value.lines()
    assert "routes[2].plugins.header-stamp.colour: unknown field" in lines
    assert any(line.startswith("routes[2].plugins.header-stamp.header_name: ") for line in lines)
