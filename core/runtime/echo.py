"""The bundled echo upstream: an HTTP/1.1 server (h11 on trio) that answers
every request with ``200`` and a JSON description of what it received::

    {"method": "GET", "path": "/hello", "query": "name=demo",
     "headers": {"host": "...", "x-key-id": "key_...", ...}, "body_bytes": 0}

``triogate demo`` puts it behind the gateway, so a newcomer sees exactly what
reaches an upstream (the API key does not; ``X-Key-ID`` and ``X-Request-ID``
do). It needs nothing beyond h11 and trio. On its own::

    python -m triogate.runtime.echo [PORT]
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence

import h11
import trio

__all__ = ["EchoUpstream", "describe", "read_request"]

MAX_HEAD_BYTES = 65536
_RECEIVE = 65536


def describe(
    method: str, target: str, headers: Sequence[tuple[str, str]], body_bytes: int
) -> bytes:
    """The echo answer's body. Repeated headers are joined with ``", "``."""
    path, _, query = target.partition("?")
    merged: dict[str, str] = {}
    for name, value in headers:
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    doc = {
        "method": method,
        "path": path,
        "query": query,
        "headers": merged,
        "body_bytes": body_bytes,
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


async def read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, int] | None:
    """One whole request off ``stream`` (its head and how many body bytes
    came), or None when the peer closed the connection instead."""
    head: h11.Request | None = None
    body_bytes = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_RECEIVE))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body_bytes += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, body_bytes
        else:  # ConnectionClosed (or PAUSED, which a server never sees here)
            return None


class EchoUpstream:
    """``await nursery.start(echo.run)`` hands back the URL it listens on
    (``port=0``: a free port). It serves until cancelled."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests = 0  # answered so far

    def __repr__(self) -> str:
        return f"<EchoUpstream {self.url} {self.requests} requests>"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.url)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while await self._exchange(conn, stream):
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send(conn, stream, exc.error_status_hint, "HEAD", b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        """One request and its answer; False when the connection is done."""
        request = await read_request(conn, stream)
        if request is None:
            return False
        head, body_bytes = request
        method = head.method.decode("ascii")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]
        body = describe(method, head.target.decode("latin-1"), headers, body_bytes)
        self.requests += 1
        await self._send(conn, stream, 200, method, body)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    @staticmethod
    async def _send(
        conn: h11.Connection, stream: trio.SocketStream, status: int, method: str, body: bytes
    ) -> None:
        headers = [
            ("content-type", "application/json" if status == 200 else "text/plain"),
            ("content-length", str(len(body))),
            ("server", "triogate-echo"),
        ]
        if status != 200:
            headers.append(("connection", "close"))
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if body and method != "HEAD":
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    upstream = EchoUpstream(port=int(args[0]) if args else 9000)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(upstream.run)
            print(f"triogate echo upstream listening on {url}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
