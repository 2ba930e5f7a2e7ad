"""What an upstream may answer, byte for byte: 1xx interim responses (100
Continue, 103 Early Hints) are skipped and the client gets the final answer;
an unasked-for protocol switch (101) and a broken response head are the
upstream breaking the exchange: 502 BAD_GATEWAY, never a 500."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from triogate.testing import FakeUpstream, Harness, open_harness


@asynccontextmanager
async def raw_gateway(tmp_path: Path, *answer: bytes | float) -> AsyncIterator[Harness]:
    """A gateway whose upstream answers any request with ``answer``, written
    piece by piece (a float is a pause in seconds), then closes."""

    async def raw_upstream(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        for piece in answer:
            if isinstance(piece, float):
                await trio.sleep(piece)
            else:
                await stream.send_all(piece)
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
            yield h
        nursery.cancel_scope.cancel()


async def test_interim_responses_are_skipped(tmp_path: Path) -> None:
    async with raw_gateway(
        tmp_path,
        # Two interim answers, then the final one; in separate writes.
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        0.05,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal",
    ) as h:
        r = await h.client.get("/x")
        assert r.status_code == 200
        assert r.content == b"final"
        assert r.headers["x-final"] == "yes"
        assert "link" not in r.headers  # the interim answer's headers are not the answer's


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param((SWITCH,), id="head-alone"),
        # The new protocol's bytes in the same read as the head: llhttp
        # stops there with an upgrade signal rather than a parse.
        pytest.param((SWITCH + b"\x81\x05hello",), id="head-and-frame"),
        pytest.param((SWITCH, 0.05, b"\x81\x05hello"), id="frame-later"),
    ],
)
async def test_unasked_protocol_switch_is_a_bad_gateway(
    tmp_path: Path, answer: tuple[bytes | float, ...]
) -> None:
    async with raw_gateway(tmp_path, *answer) as h:
        r = await h.client.get("/x")
        assert r.status_code == 502, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "BAD_GATEWAY"
        assert "upgrade" not in r.headers


BROKEN_HEADS = [
    ("garbage", b"GARBAGE\r\n\r\n"),
    ("not-http", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ("bad-status-code", b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"),
    ("bad-version", b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("header-without-colon", b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n"),
    ("cr-in-header-value", b"HTTP/1.1 200 OK\r\nX-A: a\rX-Evil: 1\r\n\r\n"),
    ("nul-in-header-value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n"),
    ("bad-content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n"),
    ("head-cut-short", b"HTTP/1.1 200 OK\r\nContent-Le"),
    # A body broken in the same read as its head: the head has not gone out.
    ("head-with-bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("head-over-64k", b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n"),
]


@pytest.mark.parametrize("answer", [pytest.param(a, id=i) for i, a in BROKEN_HEADS])
async def test_broken_response_head_is_a_bad_gateway(tmp_path: Path, answer: bytes) -> None:
    async with raw_gateway(tmp_path, answer) as h:
        r = await h.client.get("/x")
        assert r.status_code == 502, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "BAD_GATEWAY"
        assert "x-evil" not in r.headers


OK_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
BROKEN_BODIES = [
    # Each body comes in a later read than its head, after the head went out.
    ("bad-chunk-size", (OK_CHUNKED, 0.05, b"3\r\nabc\r\nzz\r\n")),
    ("short-content-length", (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 0.05, b"abc")),
    ("chunked-cut-short", (OK_CHUNKED, 0.05, b"3\r\nabc\r\n")),
]


@pytest.mark.parametrize("answer", [pytest.param(a, id=i) for i, a in BROKEN_BODIES])
async def test_body_broken_after_the_head_cuts_the_client_off(
    tmp_path: Path, answer: tuple[bytes | float, ...]
) -> None:
    """The head (200) is the client's already: the gateway cannot turn it into
    a 502, so it ends the client's connection without completing the body,
    which the client sees as a truncated response rather than a short one."""
    async with raw_gateway(tmp_path, *answer) as h:
        with pytest.raises(httpx.RemoteProtocolError):
            await h.client.get("/x")


@pytest.mark.parametrize(
    "answer",
    [
        # Many ordinary headers, past the 64 KiB bound (one write: the
        # kernel buffers it whole before the gateway gives up on it).
        pytest.param(
            (b"HTTP/1.1 200 OK\r\n" + (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 70, 30.0),
            id="many-headers",
        ),
        # One endless header line: llhttp never reports it as a header, so
        # only counting the bytes fed catches it.
        pytest.param(
            (b"HTTP/1.1 200 OK\r\nX-Endless: " + b"b" * 81920, 30.0),
            id="endless-line",
        ),
    ],
)
async def test_an_oversized_response_head_is_a_bad_gateway(
    tmp_path: Path, answer: tuple[bytes | float, ...]
) -> None:
    # The upstream then holds the connection open: the answer must come from
    # the bound, not from the upstream closing or the read timeout.
    async with raw_gateway(tmp_path, *answer) as h:
        r = await h.client.get("/x")
        assert r.status_code == 502
        assert r.json()["code"] == "BAD_GATEWAY"
