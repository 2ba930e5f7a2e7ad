"""Plugins' background tasks (``Plugin.background``, what the jwt plugin's
JWKS refresh runs as): owned by the config's pipeline in a real server,
started when it serves, cancelled when a reload replaces it and on stop; one
that fails is logged and ends alone while the gateway keeps serving."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import trio

from triogate.config import load_config
from triogate.control.audit import Actor
from triogate.plugins.contract import Context, NoConfig, Plugin, PluginEnv
from triogate.runtime.server import Server
from triogate.testing import FakeUpstream


class Probe(Plugin[NoConfig]):
    name = "probe"
    priority = 5
    running: ClassVar[set[int]] = set()
    started: ClassVar[list[int]] = []
    cancelled: ClassVar[list[int]] = []

    def __init__(self, config: NoConfig, env: PluginEnv) -> None:
        super().__init__(config, env)

    def access_nowait(self, ctx: Context) -> None:
        return None

    async def background(self) -> None:
        me = id(self)
        self.started.append(me)
        self.running.add(me)
        try:
            await trio.sleep_forever()
        finally:
            self.running.discard(me)
            self.cancelled.append(me)


class Broken(Plugin[NoConfig]):
    name = "broken"
    priority = 6

    def access_nowait(self, ctx: Context) -> None:
        return None

    async def background(self) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("a bug in a background task")


def write(path: Path, data_dir: Path, upstream: str, routes: list[str]) -> Path:
    text = f"""
[server]
proxy_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
data_dir = "{data_dir}"
shutdown_grace_seconds = 2

[upstreams.app]
targets = ["{upstream}"]
"""
    for name in routes:
        text += f"""
[[routes]]
name = "{name}"
path = "/{name}"
upstream = "app"
plugins = {{ probe = {{}}, broken = {{}} }}
"""
    path.write_text(text)
    return path


async def until(condition: Any, what: str) -> None:
    with trio.move_on_after(15):
        while not condition():  # noqa: ASYNC110 (set by the gateway's own tasks)
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def test_background_tasks_follow_the_pipeline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "triogate.dataplane.plugin_tasks")
    Probe.running.clear()
    Probe.started.clear()
    Probe.cancelled.clear()
    upstream = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        path = write(tmp_path / "gw.toml", tmp_path / "data", upstream.url, ["one"])
        server = Server(load_config(path), source=str(path), extra_plugins=[Probe, Broken])
        info = await nursery.start(server.run)
        await until(lambda: len(Probe.running) == 1, "the first config's task")
        first = set(Probe.running)
        await until(lambda: "a bug in a background task" in caplog.text, "the failure logged")
        assert "broken" in caplog.text
        async with httpx.AsyncClient(base_url=info.proxy_url) as client:
            assert (await client.get("/one")).status_code == 200  # still serving
            write(path, tmp_path / "data", upstream.url, ["one", "two"])
            assert server.gateway is not None
            await server.gateway.configs.reload(Actor("test"))
            # The new config's two instances run; the old one was cancelled.
            await until(lambda: len(Probe.running) == 2 and not first & Probe.running, "reload")
            assert first <= set(Probe.cancelled)
            assert (await client.get("/two")).status_code == 200
        server.shutdown()
        with trio.move_on_after(10):
            await server.stopped.wait()
        assert server.stopped.is_set()
        assert Probe.running == set() and len(Probe.started) == 3
        nursery.cancel_scope.cancel()
