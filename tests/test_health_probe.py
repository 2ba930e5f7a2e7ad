"""The active health probe (``health.check_once``) speaks through the
upstream client and the codec: the probe's bytes on the wire, interim 1xx
answers skipped, a protocol switch or garbage a failed probe, and the probe
connection closed, never pooled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from triogate.config import HealthCheckConfig
from triogate.dataplane.health import check_once
from triogate.dataplane.upstream import TargetPool


@asynccontextmanager
async def _upstream(
    answer: bytes | list[bytes], heard: list[bytes], closed: trio.Event | None = None
) -> AsyncIterator[TargetPool]:
    """A one-answer upstream on loopback (a list: sent in parts, a moment
    apart); what it heard goes to ``heard``."""

    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        heard.append(data)
        for part in answer if isinstance(answer, list) else [answer]:
            await stream.send_all(part)
            await trio.sleep(0.05)
        # Wait for the client to hang up (it must, the probe never pools).
        while await stream.receive_some(65536):
            pass
        heard.append(b"<closed>")
        if closed is not None:
            closed.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        pool = TargetPool(f"http://127.0.0.1:{port}/base", connect_timeout=1.0)
        yield pool
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("answer", "healthy"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", False),
        # The interim answer is not the verdict (it used to count as 100 < 400).
        (
            [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"],
            False,
        ),
        (
            [b"HTTP/1.1 103 Early Hints\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
            True,
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", False),
        (b"garbage\r\n\r\n", False),
        # A long body still streaming: the status decides, the rest is dropped.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial", True),
    ],
)
async def test_probe(answer: bytes | list[bytes], healthy: bool) -> None:
    heard: list[bytes] = []
    closed = trio.Event()
    check = HealthCheckConfig(path="/health", timeout_seconds=2.0)
    async with _upstream(answer, heard, closed) as pool:
        assert await check_once(pool, check) is healthy
        with trio.fail_after(2):
            await closed.wait()
        assert pool.active == 0 and pool.statistics().idle == 0
    port = pool.port
    assert heard == [
        b"GET /base/health HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"user-agent: triogate-health\r\nconnection: close\r\n\r\n" % port,
        b"<closed>",
    ]


async def test_probe_statuses_and_timeout() -> None:
    heard: list[bytes] = []
    answer = b"HTTP/1.1 418 Teapot\r\nContent-Length: 0\r\n\r\n"
    async with _upstream(answer, heard) as pool:
        assert await check_once(pool, HealthCheckConfig(healthy_statuses=[418])) is True
        assert await check_once(pool, HealthCheckConfig()) is False
    async with _upstream([], heard) as pool:  # never answers
        with trio.move_on_after(5) as scope:
            assert await check_once(pool, HealthCheckConfig(timeout_seconds=0.2)) is False
        assert not scope.cancelled_caught
