"""1xx interim responses from an upstream (100 Continue, 103 Early Hints) are
skipped; the client gets the final answer."""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from triogate.testing import FakeUpstream, open_harness


async def test_interim_responses_are_skipped(tmp_path: Path) -> None:
    async def raw_upstream(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        # Two interim answers, then the final one; in separate writes.
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await trio.sleep(0.05)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, raw_upstream, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        fake = FakeUpstream()
        fake.port = 1  # not started: the harness talks to the raw upstream instead
        async with open_harness(
            tmp_path, upstream=fake, upstream_settings={"targets": [f"http://127.0.0.1:{port}"]}
        ) as h:
            r = await h.client.get("/x")
            assert r.status_code == 200
            assert r.content == b"final"
            assert r.headers["x-final"] == "yes"
            assert "link" not in r.headers  # the interim answer's headers are not the answer's
        nursery.cancel_scope.cancel()
