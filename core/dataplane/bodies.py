"""The request and answer bodies as async generators, read as they are consumed.

Apart from ``connection`` and ``exchange`` because those are compiled with
mypyc, which does not compile async generators; a body's generator runs once
per chunk of a streamed body, not on the path of every request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httptools

from triogate.errors import BadGateway, ClientDisconnected, GatewayError, UpstreamTimeout

if TYPE_CHECKING:
    from triogate.dataplane.connection import Connection
    from triogate.dataplane.exchange import UpstreamConnection
    from triogate.http.h1client import ResponseParser
    from triogate.http.h1parse import PendingRequest

__all__ = ["answer_body", "request_body"]


async def request_body(conn: Connection, pending: PendingRequest) -> AsyncIterator[bytes]:
    """The body of the client's request ``pending``: what llhttp has queued,
    then more read from the client as the consumer (the upstream client)
    asks, so a slow upstream slows the client down instead of filling memory."""
    cfg = conn.listener.config
    try:
        if pending.expect_continue and not conn._continue_sent:
            conn._continue_sent = True
            await conn._send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            while pending.chunks:
                yield pending.chunks.popleft()
            if pending.error is not None:
                raise pending.error
            if pending.complete:
                return
            data = await conn._recv(cfg.body_timeout_seconds, pending.body_deadline)
            if not data:
                raise ClientDisconnected()
            conn._feed(data)
    except (GatewayError, ClientDisconnected):
        pending.broken = True
        # Out of step (e.g. an upgrade head right after a complete body):
        # close after the answer, never serve what follows.
        pending.keep_alive = False
        raise


async def answer_body(
    conn: UpstreamConnection,
    parsed: ResponseParser,
    read_timeout: float,
    keep_alive: bool,
    generation: int,
) -> AsyncIterator[bytes]:
    """The rest of an upstream answer's body; the connection goes back to
    its pool (reusable only when the body ended cleanly) however it ends."""
    done = False
    try:
        while True:
            while parsed.body:
                yield parsed.body.popleft()
            if parsed.complete:
                done = True
                return
            try:
                data = await conn._recv(read_timeout)
            except OSError as exc:
                raise BadGateway(f"upstream connection failed mid-body: {exc}") from exc
            if data is None:
                raise UpstreamTimeout("upstream stalled while sending the body")
            if not data:
                # Close-delimited body (no length, no chunking) ends here.
                if parsed.keep_alive or not parsed.close_delimited():
                    raise BadGateway("upstream closed the connection mid-body")
                keep_alive = False
                done = True
                return
            try:
                parsed.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise BadGateway(f"upstream broke the HTTP protocol: {exc}") from exc
    finally:
        conn._give_back(done and keep_alive, generation)
