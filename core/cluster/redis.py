"""The process's link to the cluster's Redis: one coredis client from
``[cluster] redis_url``, and how Redis is doing (reachable, last round trip).

Theory of operation
-------------------
``open_redis(config)`` enters the coredis client (coredis 6 is an async
context manager over an anyio task group; under trio that is a nursery) and
runs a health task beside it: every ``health_interval_seconds`` a ``PING``
measures the round trip and says whether Redis answers. Nothing here
retries commands: coredis's pool opens a new connection for the next command
once one broke, so the link reconnects by itself, and whoever sent a command
decides what a failure means (the decisions fall back, an admin write is
refused). Whoever sees a command fail calls ``RedisLink.failed``, so every
user learns at once that Redis is gone, not at the next ping; a command that
succeeds, or the next good ping, marks it reachable again.

URL forms: ``redis://``, ``rediss://`` (TLS) and ``unix://`` as coredis
reads them; ``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db]``
asks the Sentinels for the primary of ``SERVICE`` (coredis follows a
failover: a command after it reaches the new primary).
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final

import coredis
import msgspec
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from triogate.config import ClusterConfig

__all__ = [
    "REDIS_ERRORS",
    "RedisHealth",
    "RedisLink",
    "SentinelUrl",
    "open_redis",
    "parse_sentinel_url",
    "redacted",
]

log = logging.getLogger("triogate.cluster.redis")

#: What a lost, frozen or refusing Redis raises through coredis and trio.
REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError, trio.TooSlowError)

#: A reply may take this much longer than ``command_timeout_seconds`` before
#: coredis gives up on the connection (the callers' own timeouts are shorter).
STREAM_TIMEOUT_FLOOR: Final = 2.0


def redacted(url: str) -> str:
    """``url`` without its password (it goes to logs, /health and errors)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class SentinelUrl(msgspec.Struct, frozen=True):
    """``redis+sentinel://`` read: the Sentinels, the service, the database."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Read ``redis+sentinel://[user:pw@]h1:26379,h2:26379/SERVICE[/db]``
    (``rediss+sentinel://`` for TLS); ``ValueError`` names what is wrong."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ValueError("not a redis+sentinel:// URL")
    auth, _, hostpart = rest.rpartition("@")
    hosts, _, path = hostpart.partition("/")
    steps = [p for p in path.split("/") if p]
    if not steps:
        raise ValueError("a Sentinel URL names the service: redis+sentinel://host:26379/SERVICE")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a Sentinel is host:port, not {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    if len(steps) > 2 or (len(steps) == 2 and not steps[1].isdigit()):
        raise ValueError("after the service only a database number may follow")
    user, _, password = auth.partition(":")
    return SentinelUrl(
        tuple(sentinels),
        urllib.parse.unquote(steps[0]),
        int(steps[1]) if len(steps) == 2 else 0,
        urllib.parse.unquote(user) or None,
        urllib.parse.unquote(password) if password else None,
        scheme == "rediss+sentinel",
    )


class RedisHealth(msgspec.Struct, frozen=True):
    """A snapshot for ``/health`` and the metrics."""

    reachable: bool
    #: The last successful PING's round trip, seconds (None: none yet).
    rtt_seconds: float | None
    #: Commands and pings that failed since the process started.
    errors: int
    #: What the last failure was (its class and message, no secrets).
    last_error: str | None
    #: ``time.time()`` of the last change between reachable and not.
    since: float


class RedisLink:
    """The process's one client, with its health. Built by ``open_redis``."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        url: str,
        config: ClusterConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.url = redacted(url)
        self.config = config
        self._clock = clock
        self.reachable = False
        self.rtt_seconds: float | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.since = clock()
        #: Set each time Redis turns reachable (a new Event then): whoever
        #: waits for a recovery (``wait_reachable``) wakes.
        self._up = trio.Event()
        #: Called with True/False on every change (script loading, fallbacks).
        self.listeners: list[Callable[[bool], None]] = []

    def __repr__(self) -> str:
        state = "up" if self.reachable else "down"
        return f"<RedisLink {self.url} {state} errors={self.errors}>"

    def health(self) -> RedisHealth:
        return RedisHealth(
            self.reachable, self.rtt_seconds, self.errors, self.last_error, self.since
        )

    # ---- what the users of the client report --------------------------------------

    def ok(self, rtt: float | None = None) -> None:
        """A command or ping succeeded (``rtt``: its round trip)."""
        if rtt is not None:
            self.rtt_seconds = rtt
        if not self.reachable:
            self.reachable = True
            self.since = self._clock()
            log.info("the cluster's Redis is reachable (%s)", self.url)
            self._up.set()
            self._notify(True)

    def failed(self, exc: BaseException) -> None:
        """A command or ping failed: Redis counts as unreachable until one works."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.reachable:
            self.reachable = False
            self.since = self._clock()
            self._up = trio.Event()
            log.warning("the cluster's Redis is unreachable (%s): %s", self.url, self.last_error)
            self._notify(False)

    def _notify(self, up: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(up)
            except Exception:  # a listener's bug must not stop the health task
                log.exception("a Redis health listener failed")

    async def wait_reachable(self) -> None:
        """Return once Redis is reachable (at once if it is)."""
        while not self.reachable:
            await self._up.wait()

    # ---- the health task ------------------------------------------------------------

    async def ping(self) -> bool:
        """One PING within the connect timeout; updates the health."""
        started = time.perf_counter()
        try:
            with trio.fail_after(self.config.connect_timeout_seconds):
                await self.client.ping()
        except REDIS_ERRORS as exc:
            self.failed(exc)
            return False
        self.ok(time.perf_counter() - started)
        return True

    async def run_health(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """PING every ``health_interval_seconds``, forever (cancel to stop).
        The first ping happens before ``task_status.started()``."""
        await self.ping()
        task_status.started()
        while True:
            await trio.sleep(self.config.health_interval_seconds)
            await self.ping()


def _client_kwargs(config: ClusterConfig) -> dict[str, Any]:
    return {
        "connect_timeout": config.connect_timeout_seconds,
        "stream_timeout": max(STREAM_TIMEOUT_FLOOR, 4 * config.command_timeout_seconds),
        # No blind retries: a decision or a commit retried after a lost reply
        # could count twice. The callers decide.
        "retry_policy": NoRetryPolicy(),
    }


@asynccontextmanager
async def _sentinel_client(url: str, config: ClusterConfig) -> AsyncIterator[coredis.Redis[bytes]]:
    spec = parse_sentinel_url(url)
    kwargs = _client_kwargs(config)
    auth: dict[str, Any] = {}
    if spec.username is not None:
        auth["username"] = spec.username
    if spec.password is not None:
        auth["password"] = spec.password
    if spec.tls:
        auth["ssl"] = True
    sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(
        [TCPLocation(host, port) for host, port in spec.sentinels],
        sentinel_kwargs={"connect_timeout": config.connect_timeout_seconds},
        **kwargs,
    )
    async with sentinel:
        primary = sentinel.primary_for(spec.service, db=spec.db, **auth)
        async with primary:
            yield primary


@asynccontextmanager
async def open_redis(
    config: ClusterConfig,
    *,
    health: bool = True,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[RedisLink]:
    """The process's Redis link for ``config.redis_url`` (which must be set),
    with its health task running (``health=False``: none; tests and one-shot
    CLI commands ping themselves). Entering does not need Redis to answer:
    an unreachable Redis is a state (``reachable`` False), not an error.
    coredis wraps an exception leaving the block in an exception group; it
    comes back bare when it is alone."""
    url = config.redis_url
    if url is None:
        raise ValueError("[cluster] redis_url is not set")
    try:
        async with AsyncExitStack() as stack:
            if "+sentinel://" in url:
                client = await stack.enter_async_context(_sentinel_client(url, config))
            else:
                client = coredis.Redis.from_url(url, **_client_kwargs(config))
                await stack.enter_async_context(client)
            link = RedisLink(client, url, config, clock=clock)
            if health:
                nursery = await stack.enter_async_context(trio.open_nursery())
                await nursery.start(link.run_health)
                stack.callback(nursery.cancel_scope.cancel)
            yield link
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
