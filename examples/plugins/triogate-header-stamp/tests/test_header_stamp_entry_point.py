"""The installed package registers the plugin: the gateway finds it by name,
through the ``triogate.plugins`` entry-point group, like a built-in.

Needs ``pip install -e examples/plugins/triogate-header-stamp`` (an editable
install is enough; a change to the entry point needs a re-install).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from triogate_header_stamp import HeaderStamp

from triogate.testing import ENTRY_POINT_GROUP, discover, open_harness


def test_registered_as_an_entry_point() -> None:
    (ep,) = entry_points(group=ENTRY_POINT_GROUP, name="header-stamp")
    assert ep.value == "triogate_header_stamp:HeaderStamp"
    assert ep.dist is not None
    assert ep.dist.name.replace("_", "-") == "triogate-header-stamp"
    assert discover()["header-stamp"] is HeaderStamp


async def test_used_by_name_only(tmp_path: Path) -> None:
    # No extra_plugins: the gateway's own discovery finds it.
    async with open_harness(tmp_path, plugins={"header-stamp": {}}) as h:
        r = await h.client.get("/orders")
        assert r.headers["x-gateway-stamp"] == "route=test; key=-"
        assert h.server.gateway is not None
        (route,) = h.server.gateway.current_pipeline().describe_routes()
        assert [(p.name, p.priority, p.phases) for p in route.plugins] == [
            ("header-stamp", 850, ("access", "response"))
        ]
