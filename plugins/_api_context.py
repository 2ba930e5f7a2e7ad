"""The plugin API, part 1: what a plugin sees of one request.

Private module: plugin authors import these names from
``triogate.plugins.contract`` (see its docstring for the whole contract).

``Context`` is one request's journey through the pipeline; ``RouteView``
the route it matched; ``Consumer`` the API key that key-auth accepted;
``UpstreamView`` the upstream the route sends to. All typed, none of them
the gateway's internal objects: a plugin depends on this module and the pure
decision modules only, so the gateway's insides can change under it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from triogate.http import Headers, Request
from triogate.policy.breaker import BreakerSettings, FailurePolicy
from triogate.policy.ratelimit import Decision

if TYPE_CHECKING:
    from triogate.config import RouteConfig

__all__ = ["Consumer", "Context", "RouteView", "Subject", "UpstreamView"]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True, slots=True)
class RouteView:
    """A configured route, read-only: what ``ctx.route`` is and what
    ``bind`` receives. Made by the gateway once per route and config load."""

    name: str
    #: Position in the config's ``routes`` list.
    index: int
    #: The path template as configured (``/users/{id:int}``).
    path: str
    #: The name of the upstream (``[upstreams.NAME]``) the route sends to.
    upstream: str
    #: The route's ``upstream_path`` rewrite template; None: the path is kept.
    upstream_path: str | None
    #: The methods it answers; None: every method.
    methods: frozenset[str] | None
    #: The route's API version (``version = ...``); None if it has none of
    #: its own (a path with ``{version}``: see ``ctx.version``).
    version: str | None

    @classmethod
    def of(cls, route: RouteConfig, index: int) -> RouteView:
        return cls(
            name=route.name,
            index=index,
            path=route.path,
            upstream=route.upstream,
            upstream_path=route.upstream_path,
            methods=frozenset(route.methods) if route.methods else None,
            version=route.version,
        )


class Consumer(Protocol):
    """The API key a request came with, once key-auth accepted it
    (``ctx.consumer``). The gateway's key records fit this."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def scopes(self) -> tuple[str, ...]: ...

    @property
    def state_key(self) -> str:
        """The id whose limiter state and credits the key spends: the first
        key of its rotation chain (a rotated key and its successor are one)."""
        ...

    @property
    def roles(self) -> tuple[str, ...]:
        """The key's role names (sent upstream as ``X-Key-Roles``); ``()``
        for none."""
        ...


@dataclass(frozen=True, slots=True, eq=False)
class Subject:
    """Who a request comes from as a verified token says (``ctx.subject``,
    set by the ``jwt`` plugin). Not an API key: the gateway keeps no record
    of it, and its limits (a ``rate-limit`` with ``by = "consumer"``) live
    in memory like an address's."""

    #: The value of the configured consumer claim (``sub`` by default).
    id: str
    #: The token's ``iss``, None without one.
    issuer: str | None
    #: Whose requests count together: the issuer and the id (two issuers
    #: may both have a subject ``42``).
    state_key: str
    #: Every verified claim of the token (read-only by convention).
    claims: Mapping[str, Any]


class UpstreamView(Protocol):
    """The upstream a route sends to (``bind``'s second argument, and
    ``ctx.upstream`` for the upstream wrappers)."""

    @property
    def name(self) -> str: ...

    @property
    def targets(self) -> Sequence[str]:
        """The target URLs, as configured."""
        ...

    def begin_retry(self, ratio: float, minimum: int) -> bool:
        """The retry budget the upstream's routes share: may one more retry
        run now? Retries in flight stay under ``ratio`` of the requests in
        flight (at least ``minimum``). Every True must be followed by one
        ``end_retry()``."""
        ...

    def end_retry(self) -> None: ...

    def use_breaker(self, settings: BreakerSettings, failures: FailurePolicy) -> None:
        """From ``bind`` only: give every target of this upstream a circuit
        breaker. The first route of a config to ask sets it; it takes effect
        when the whole config is applied. The upstream client then reports
        every exchange's outcome (as ``failures`` judges it) to the target's
        breaker, and its balancer skips open targets."""
        ...


class Context:
    """One request's journey through the pipeline.

    ``request`` is what will be sent upstream (plugins may change it), and
    ``upstream_path`` the path it goes to; ``route`` (a ``RouteView``),
    ``params`` and ``version`` come from the router; ``consumer`` is the key
    once key-auth has run, ``subject`` the token's subject once jwt has;
    ``response_headers`` are added to whatever response goes back (also to
    errors and early answers).

    ``rate_limits`` collects every limit decision made for the request (the
    gateway reports the most restrictive in the ``RateLimit`` headers);
    ``undo`` holds callbacks that give back what was taken (rate-limit
    tokens, credits) if the gateway ends up refusing the request, so a
    refused request consumes nothing. ``sent_upstream`` turns true once any
    byte of the request was written to an upstream socket: from then on the
    request is charged, whatever happens after (a 502, a 504, the client
    leaving), and ``undo`` is no longer run.

    The upstream call: ``upstream`` is the route's upstream (set before the
    upstream wrappers run); ``tried_targets`` is None unless a wrapper asks
    for a retry to prefer targets not tried yet by setting it to a set
    (the upstream client adds each target it sends to); ``retries`` counts
    the tries after the first; ``upstream_seconds`` is the time spent
    waiting for the upstream's answer heads, summed over tries.

    ``state`` is a free-form dict for a plugin's own per-request data
    (made on first use); the gateway's own data are the fields above.
    """

    __slots__ = (
        "_state",
        "client_ip",
        "consumer",
        "params",
        "rate_limits",
        "request",
        "request_id",
        "response_headers",
        "retries",
        "route",
        "sent_upstream",
        "started_at",
        "subject",
        "tried_targets",
        "undo",
        "upstream",
        "upstream_path",
        "upstream_seconds",
        "version",
    )

    def __init__(
        self,
        request: Request,
        *,
        request_id: str,
        started_at: float,
        route: RouteView | None = None,
        params: dict[str, str] | None = None,
        version: str | None = None,
    ) -> None:
        self.request = request
        self.request_id = request_id
        self.started_at = started_at
        self.client_ip = request.client_ip
        self.route = route
        self.params = params or {}
        self.version = version
        self.consumer: Consumer | None = None
        self.subject: Subject | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.upstream_path: str = request.path
        self.rate_limits: list[Decision] = []
        self.undo: list[Callable[[], None]] = []
        self.sent_upstream = False  # set by the upstream client (CONTRACT §5)
        self.upstream: UpstreamView | None = None
        self.tried_targets: set[str] | None = None
        self.retries = 0
        self.upstream_seconds: float | None = None
        self._state: dict[str, Any] | None = None

    def __repr__(self) -> str:
        route = self.route.name if self.route is not None else None
        return f"<Context {self.request_id} {self.request!r} route={route}>"

    @property
    def client_cert(self) -> str | None:
        """The subject of the client's verified TLS certificate (mTLS on
        ``[server.tls]``), RFC 4514 like ``CN=alice,O=Example``; None on a
        plain connection or without a certificate. Read from the request,
        so a plain request pays nothing for it."""
        return self.request.client_cert

    @property
    def state(self) -> dict[str, Any]:
        """Scratch space for plugins' own per-request data (namespace the
        keys with the plugin's name). Made on first use: most requests never
        need one."""
        state = self._state
        if state is None:
            state = self._state = {}
        return state

    def add_response_header(self, name: str, value: str) -> None:
        """Add a header to whatever response goes back. CR, LF and NUL are
        refused (ValueError): a plugin must not be able to split a response."""
        if not _TOKEN.match(name):
            raise ValueError(f"not a header name: {name!r}")
        headers = Headers()
        headers.add(name, value)  # checks the value
        self.response_headers.extend(headers.raw)
