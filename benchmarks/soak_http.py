"""HTTP for the soak benchmark, on h11 and trio (both triogate dependencies,
so ``triogate bench soak`` needs nothing else):

* ``SoakUpstream``: the upstream behind the gateway. Unlike the bundled echo
  upstream it fails and dawdles on request: ``/error/...?status=503``
  answers that status, ``/slow/...?delay_ms=2500`` waits that long first.
  Every answer carries ``x-soak-upstream: 1``, so the load generator knows
  for sure which answers the gateway made itself.
* ``Connection``: one keep-alive client connection (the load generator runs
  one per worker); ``fetch`` does one request on a fresh connection that is
  closed afterwards (the admin API calls).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs

import h11
import trio

from triogate.runtime.echo import read_request

__all__ = ["MARK", "Answer", "Connection", "SoakUpstream", "TransportError", "fetch"]

MARK = "x-soak-upstream"
MAX_DELAY_MS = 60_000
_RECEIVE = 65536


class SoakUpstream:
    """``await nursery.start(upstream.run)`` hands back its port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.answered = 0
        self.abandoned = 0  # answers the gateway no longer waited for (its timeout)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while await self._exchange(conn, stream):
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            self.abandoned += conn.our_state is h11.SEND_RESPONSE
        finally:
            await stream.aclose()

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        request = await read_request(conn, stream)
        if request is None:
            return False
        head, received = request
        path, _, query = head.target.decode("latin-1").partition("?")
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        status = 200
        if path.startswith("/error/"):
            status = int(params.get("status", "500"))
        if path.startswith("/slow/"):
            delay = min(max(int(params.get("delay_ms", "0")), 0), MAX_DELAY_MS)
            await trio.sleep(delay / 1000)
        if status == 200:
            body = json.dumps({"path": path, "received": received}).encode()
            kind = "application/json"
        else:
            body, kind = f"upstream error {status} on purpose\n".encode(), "text/plain"
        headers = [("content-type", kind), ("content-length", str(len(body))), (MARK, "1")]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if head.method != b"HEAD":
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        self.answered += 1
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE


class TransportError(Exception):
    """The connection failed: refused, reset, closed mid-answer, or garbled."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; repeated ones joined with ", "
    body: bytes

    @property
    def from_upstream(self) -> bool:
        return MARK in self.headers

    @property
    def code(self) -> str | None:
        """The ``code`` of a problem+json answer (the gateway's own)."""
        if not self.headers.get("content-type", "").startswith("application/problem+json"):
            return None
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        code = doc.get("code") if isinstance(doc, dict) else None
        return code if isinstance(code, str) else None

    def json(self) -> object:
        return json.loads(self.body)


class Connection:
    """One client connection, reopened after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._conn = h11.Connection(h11.CLIENT)
        self.opened = 0

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        close: bool = False,
    ) -> Answer:
        """One exchange; ``close`` asks the server to close afterwards (and
        closes here in any case). Any failure closes the connection."""
        try:
            return await self._exchange(method, target, headers, body, close)
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
        ) as e:
            await self.aclose()
            raise TransportError(f"{type(e).__name__}: {e}") from e
        except BaseException:
            await self.aclose()  # cancelled mid-exchange: the connection is unusable
            raise

    async def _exchange(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        close: bool,
    ) -> Answer:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._conn = h11.Connection(h11.CLIENT)
            self.opened += 1
        stream, conn = self._stream, self._conn
        head = [("host", f"{self.host}:{self.port}"), *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(("content-length", str(len(body))))
        if close:
            head.append(("connection", "close"))
        out = conn.send(h11.Request(method=method, target=target, headers=head))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_RECEIVE)
                if not data and conn.their_state is not h11.SEND_BODY:
                    # A close before the head is an error; h11 says so itself
                    # for a close inside a framed body.
                    raise trio.BrokenResourceError("the server closed the connection")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("the server closed the connection")
        assert response is not None
        merged: dict[str, str] = {}
        for raw_name, raw_value in response.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            merged[name] = f"{merged[name]}, {value}" if name in merged else value
        if close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            await self.aclose()
        else:
            conn.start_next_cycle()
        return Answer(response.status_code, merged, b"".join(chunks))


async def fetch(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> Answer:
    """One request on its own connection (the admin API calls: rare, and a
    kept-alive connection could meet the server's idle timeout between them)."""
    conn = Connection(host, port)
    try:
        return await conn.request(method, target, headers, body, close=True)
    finally:
        await conn.aclose()
