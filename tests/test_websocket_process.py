"""WebSockets through the real ``triogate serve`` executable: a real client
(wsproto over a trio socket) and a real echo server (wsproto over trio, in
this process) on 127.0.0.1; SIGTERM drains the relay with close 1001 to both
sides, and the process exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

import trio
from wsproto.events import AcceptConnection, CloseConnection

from tests.helpers_process import ServeProcess, start_serve, write_config
from tests.test_websocket import WAIT, EchoServer, until, ws_connect


def config_file(tmp_path: Path, upstream_url: str) -> Path:
    path = write_config(tmp_path / "triogate.toml", tmp_path / "data")
    with path.open("a") as f:
        f.write(
            f'\n[upstreams.echo]\ntargets = ["{upstream_url}"]\n\n'
            '[[routes]]\nname = "ws"\npath = "/ws"\nupstream = "echo"\n'
        )
    return path


async def test_echo_and_a_drain_through_triogate_serve(tmp_path: Path) -> None:
    echo = EchoServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(echo.run)
        config = config_file(tmp_path, echo.url)
        sp: ServeProcess = await trio.to_thread.run_sync(start_serve, config)
        try:
            port = int(sp.proxy_url.rsplit(":", 1)[1])
            async with ws_connect(port) as (client, first):
                assert isinstance(first, AcceptConnection), first
                assert await client.echo("through serve") == "through serve"
                assert await client.echo(b"\x00bytes") == b"\x00bytes"
                sp.proc.send_signal(signal.SIGTERM)
                event = await client.event()
                assert isinstance(event, CloseConnection), event
                assert (event.code, event.reason) == (1001, "going away")
                await client.send(event.response())
                await until(lambda: echo.closes == [1001])
            with trio.fail_after(WAIT * 2):
                status = await trio.to_thread.run_sync(sp.proc.wait)
            assert status == 0, sp.stderr()
            assert "Traceback" not in sp.stderr()
        finally:
            if sp.running:
                sp.kill()
        nursery.cancel_scope.cancel()
