"""The thin decision path: ``EVALSHA`` pipelines over the process's own trio
socket, parsed by ``hiredis.Reader`` (a RESP parser in C).

Why: measured in the same runs, a decision batched over a coredis pipeline
cost 37-51 µs of client CPU, over this path 22-32 µs (0.52-0.63x); a lone
one 221-247 µs against 73-94 µs (its request objects, its packer, its response
callbacks, anyio; docs/cluster.md, Benchmark). The batcher sends its
decisions here; coredis stays
the client for everything else (records, the change stream, health, credit
operations, ``SCRIPT LOAD``).

Theory of operation
-------------------
``RespTarget`` is where and how to connect, read from the coredis client
built from ``[cluster] redis_url`` (``target_of``), so both read the URL
alike: host and port or a unix socket, TLS with the same ``ssl.SSLContext``
(``rediss://`` and its ``ssl_*`` query arguments), ``user:password@`` and
the database. A Sentinel URL has no fixed target (the primary moves): the
batcher keeps coredis then.

``RespPath.exchange(payload, count)`` writes one pipeline and reads
``count`` replies, in order. A reply that is an error (``NOSCRIPT``, a
script's error) comes back as a coredis exception object in its place (the
batcher reloads the scripts and retries ``NOSCRIPT`` runs once). A lost
connection, a protocol error or a cancellation (the batcher's timeout)
in the middle of an exchange closes the connection (replies still on the
way would answer the wrong requests) and raises coredis's
``ConnectionError`` (or lets the cancellation through): the batcher fails
the pending runs and the link marks Redis unreachable, as with coredis.

The connection is opened on first use, within ``connect_timeout_seconds``
(``AUTH``, ``SELECT``). Before each pipeline a peek at the idle socket
(one non-blocking ``recv``) tells whether Redis closed it meanwhile (a
restart): then it is reopened first, so a stale connection does not cost
a pipeline of decisions their answer. A failed connect waits before the
next attempt (``BACKOFF_FIRST`` doubling up to ``BACKOFF_MAX``); ``reset_backoff``
(the link saw Redis answer a ping) allows one at once. Only the batcher
task uses a ``RespPath``: one exchange at a time, never concurrent.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any, Final

import coredis
import hiredis
import msgspec
import trio
from coredis.connection import TCPLocation, UnixDomainSocketLocation
from coredis.exceptions import AuthenticationFailureError, NoScriptError, ResponseError
from coredis.exceptions import ConnectionError as RedisConnectionError

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "RespPath",
    "RespTarget",
    "encode_command",
    "evalsha",
    "reply_error",
    "target_of",
]

BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 2.0
#: Bytes asked of the socket per read (a pipeline of 256 replies is ~40 KiB).
READ_SIZE: Final = 1 << 18


class RespTarget(msgspec.Struct, frozen=True):
    """Where the decisions connect and how."""

    host: str | None = None
    port: int = 6379
    #: A unix socket's path (then ``host`` is None).
    path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    #: Set for ``rediss://``: the context coredis built from the URL.
    ssl_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:  # no password in logs
        where = self.path if self.path is not None else f"{self.host}:{self.port}"
        return f"RespTarget({where}, db={self.db}, tls={self.ssl_context is not None})"


def target_of(client: Any) -> RespTarget | None:
    """The target of a coredis client made by ``coredis.Redis.from_url``;
    None when it has none fixed (a Sentinel's primary, a cluster)."""
    if not isinstance(client, coredis.Redis):
        return None
    pool = client.connection_pool
    if isinstance(pool, coredis.SentinelConnectionPool):
        return None  # its location is the primary of the moment: it moves
    location = getattr(pool, "location", None)
    kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}))
    username: str | None = kwargs.get("username") or None
    password: str | None = kwargs.get("password") or None
    db = int(kwargs.get("db") or 0)
    if isinstance(location, UnixDomainSocketLocation):
        return RespTarget(path=location.path, username=username, password=password, db=db)
    if isinstance(location, TCPLocation):
        return RespTarget(
            host=location.host,
            port=int(location.port),
            username=username,
            password=password,
            db=db,
            ssl_context=kwargs.get("ssl_context"),
        )
    return None


def reply_error(message: str) -> Exception:
    """The coredis exception for an error reply (what coredis would raise)."""
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


def _protocol_error(message: str) -> Exception:
    return RedisConnectionError(f"Redis protocol error: {message}")


def encode_command(*parts: str | bytes | int) -> bytes:
    """One command, encoded (a RESP array of bulk strings)."""
    return hiredis.pack_command(parts)  # type: ignore[no-any-return,arg-type]


class _Connection:
    """One open connection: a trio stream, its reader and a probe."""

    __slots__ = ("probe", "reader", "stream")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.reader = hiredis.Reader(replyError=reply_error, protocolError=_protocol_error)
        raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        # A second handle on the socket (dup), to peek without trio's machinery.
        self.probe = socket.fromfd(raw.socket.fileno(), raw.socket.family, raw.socket.type)
        self.probe.setblocking(False)

    def gone(self) -> bool:
        """Whether the peer closed the connection while it was idle (Redis
        restarted): checked before a pipeline is sent, so a stale connection
        costs a reconnect rather than a pipeline of decisions. One syscall."""
        try:
            return self.probe.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False  # nothing to read: the usual case
        except OSError:
            return True

    async def aclose(self) -> None:
        self.probe.close()
        await trio.aclose_forcefully(self.stream)

    async def exchange(self, payload: bytes, count: int) -> list[Any]:
        await self.stream.send_all(payload)
        reader = self.reader
        out: list[Any] = []
        while len(out) < count:
            reply = reader.gets()
            if reply is False:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                reader.feed(bytes(data))
                continue
            out.append(reply)
        return out


async def _open(target: RespTarget) -> _Connection:
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    if target.path is not None:
        stream = await trio.open_unix_socket(target.path)
    elif target.ssl_context is not None:
        assert target.host is not None
        tls = await trio.open_ssl_over_tcp_stream(
            target.host, target.port, ssl_context=target.ssl_context, https_compatible=False
        )
        await tls.do_handshake()
        stream = tls
    else:
        assert target.host is not None
        stream = await trio.open_tcp_stream(target.host, target.port)
    conn: _Connection | None = None
    try:
        conn = _Connection(stream)
        hello: list[bytes] = []
        if target.password is not None:
            if target.username is not None:
                hello.append(encode_command("AUTH", target.username, target.password))
            else:
                hello.append(encode_command("AUTH", target.password))
        if target.db:
            hello.append(encode_command("SELECT", target.db))
        if hello:
            replies = await conn.exchange(b"".join(hello), len(hello))
            for reply in replies:
                if isinstance(reply, ResponseError):
                    if target.password is not None and reply is replies[0]:
                        raise AuthenticationFailureError(str(reply))
                    raise RedisConnectionError(f"Redis refused the connection's setup: {reply}")
    except BaseException:
        if conn is not None:
            conn.probe.close()
        await trio.aclose_forcefully(stream)
        raise
    return conn


class RespPath:
    """The decisions' own connection, reopened after a loss (module doc)."""

    def __init__(self, target: RespTarget, *, connect_timeout: float) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._backoff = 0.0
        self._retry_at = -float("inf")
        #: Connections opened (the first one included) and lost.
        self.connects = 0
        self.losses = 0

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<RespPath {self.target!r} {state} connects={self.connects} losses={self.losses}>"

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def reset_backoff(self) -> None:
        """Redis answered elsewhere: the next exchange may connect at once."""
        self._backoff = 0.0
        self._retry_at = -float("inf")

    async def _connection(self) -> _Connection:
        if self._conn is not None:
            return self._conn
        now = trio.current_time()
        if now < self._retry_at:
            raise RedisConnectionError(
                f"reconnecting to Redis in {self._retry_at - now:.2f}s (the last attempt failed)"
            )
        try:
            with trio.fail_after(self.connect_timeout):
                conn = await _open(self.target)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            self._failed_connect()
            raise RedisConnectionError(
                f"cannot connect to Redis: {type(exc).__name__}: {exc}"
            ) from exc
        except BaseException:
            self._failed_connect()
            raise
        self.reset_backoff()
        self.connects += 1
        self._conn = conn
        return conn

    def _failed_connect(self) -> None:
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
        self._retry_at = trio.current_time() + self._backoff

    async def exchange(self, payload: bytes, count: int) -> list[Any]:
        """Send ``payload`` (``count`` commands) and return their ``count``
        replies, error replies as coredis exception objects in their place."""
        conn = await self._connection()
        if conn.gone():
            self.losses += 1
            await self.close()
            conn = await self._connection()
        try:
            return await conn.exchange(payload, count)
        except BaseException as exc:
            self.losses += 1  # first: closing may raise the cancellation again
            await self.close()
            if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                raise RedisConnectionError(f"lost the connection to Redis: {exc!r}") from exc
            raise

    async def command(self, *parts: str | bytes | int) -> Any:
        """One command's reply (tests, the benchmark): an error reply raises."""
        (reply,) = await self.exchange(encode_command(*parts), 1)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()


def evalsha(sha: str, keys: Sequence[str], args: Sequence[str]) -> bytes:
    """One ``EVALSHA`` run, encoded."""
    return hiredis.pack_command((b"EVALSHA", sha, len(keys), *keys, *args))  # type: ignore[no-any-return,arg-type]
