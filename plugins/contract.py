"""The plugin contract: everything a plugin author needs, in one module.

A plugin is a class with a ``name``, a ``priority``, a ``Config`` (a
``msgspec.Struct``; unknown fields are forbidden) and one or more *phase*
methods. It is registered in the ``triogate.plugins`` entry-point group of its
package's ``pyproject.toml``; the built-in plugins are registered the same way::

    [project.entry-points."triogate.plugins"]
    my-plugin = "my_package:MyPlugin"

One instance is made per route (and per config load) with that route's
validated config, so ``__init__`` is the place for any precomputation. Only
the phases a plugin overrides are run.

Phases, in the order a request meets them:

``access(ctx)``
    Before the upstream is called. Return a ``Response`` to answer at once
    (the upstream is never called), raise a ``GatewayError`` to refuse with a
    problem+json error, or return ``None`` to go on. Runs in priority order,
    highest first.

``upstream(ctx, call_next)``
    Wraps the call to the upstream: ``await call_next()`` performs it (through
    the plugins below this one) and returns the upstream ``Response``. Retry
    and circuit breaking live here. The highest priority is the outermost
    wrapper.

``response(ctx, response)``
    After the upstream answered (or a plugin answered early), before anything
    is sent to the client: change ``response.status`` or ``response.headers``.
    A plugin that sets ``buffers_response = True`` gets the body buffered in
    ``response.content`` (up to its ``max_buffer_bytes``; larger: 502) for
    the responses its ``wants_body(ctx, response)`` accepts (default: all the
    upstream's, never the gateway's own errors), and may replace it.
    Runs in priority order, highest first.

``log(ctx, response)``
    After the response has been sent; it never delays the response. Errors
    raised here are logged and swallowed.

Besides the phases, ``bind(route, upstream)`` is called once per route when
a config is loaded, with the route's ``RouteConfig`` and its ``Upstream``
(target pools, balancer, retry budget): the place to check settings that
depend on the route, or to attach state to the upstream (the circuit
breaker gives each target its breaker there). A ``ValueError`` raised there
is a load error naming the plugin and the route.

Priorities (higher runs first), in bands as in Kong:

====================  ========  ============================================
band                  priority  built-ins
====================  ========  ============================================
tracing               >= 10000  request-id (100000)
edge / filtering      2000-9999 ip-restriction (3000), cors (2000)
limits on the request 1400-1999 request-size-limiting (1500)
authentication        1000-1399 key-auth (1250)
rate limiting         900-999   rate-limit (910)
transformation        700-899   request-transformer (800), response-transformer (790)
upstream wrappers     100-699   retry (600); circuit-breaker (500) only binds
====================  ========  ============================================

A route can move a plugin relative to others without changing priorities:
``my-plugin = { before = ["key-auth"] }`` or ``after = [...]`` in the route's
(or the global) plugin table. ``before``/``after`` are taken out before the
rest is validated against the plugin's ``Config``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import msgspec

from triogate.errors import GatewayError
from triogate.http import Body, Headers, Request, Response

if TYPE_CHECKING:
    from triogate.control.keys import KeyService
    from triogate.dataplane.actors import ActorRegistry
    from triogate.policy.ratelimit import Decision
    from triogate.storage import KeyRecord, RateLimit

__all__ = [
    "PHASES",
    "Body",
    "CallNext",
    "Context",
    "GatewayError",
    "Headers",
    "NoConfig",
    "Plugin",
    "PluginEnv",
    "Request",
    "Response",
]

PHASES = ("access", "upstream", "response", "log")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class NoConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """For plugins that take no settings."""


C = TypeVar("C", bound=msgspec.Struct)

CallNext = Callable[[], Awaitable[Response]]


@dataclass(eq=False)
class PluginEnv:
    """What the gateway lends a plugin: its services. Given to ``__init__``."""

    keys: KeyService | None = None
    actors: ActorRegistry | None = None
    #: ``[keys] default_rate_limit``: for keys without limits of their own.
    default_key_limit: RateLimit | None = None
    clock: Callable[[], float] = field(default=lambda: 0.0)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("triogate.plugins"))
    extras: dict[str, Any] = field(default_factory=dict)


class Context:
    """One request's journey through the pipeline.

    ``request`` is what will be sent upstream (plugins may change it);
    ``route`` and ``params`` come from the router; ``consumer`` is the key
    record once key-auth has run; ``state`` is scratch space shared by the
    plugins of one request; ``response_headers`` are added to whatever
    response goes back (also to errors and early answers).

    ``rate_limits`` collects every limit decision made for the request (the
    gateway reports the most restrictive in the ``RateLimit`` headers);
    ``undo`` holds callbacks that give back what was taken (rate-limit
    tokens, credits) if the gateway ends up refusing the request, so a
    refused request consumes nothing. ``sent_upstream`` turns true once any
    byte of the request was written to an upstream socket: from then on the
    request is charged, whatever happens after (a 502, a 504, the client
    leaving), and ``undo`` is no longer run.
    """

    __slots__ = (
        "client_ip",
        "consumer",
        "params",
        "rate_limits",
        "request",
        "request_id",
        "response_headers",
        "route",
        "sent_upstream",
        "started_at",
        "state",
        "undo",
        "upstream_path",
        "version",
    )

    def __init__(
        self,
        request: Request,
        *,
        request_id: str,
        started_at: float,
        route: Any = None,
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
        self.consumer: KeyRecord | None = None
        self.state: dict[str, Any] = {}
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.upstream_path: str = request.path
        self.rate_limits: list[Decision] = []
        self.undo: list[Callable[[], None]] = []
        self.sent_upstream = False  # set by the upstream client (CONTRACT §5)

    def __repr__(self) -> str:
        route = getattr(self.route, "name", None)
        return f"<Context {self.request_id} {self.request!r} route={route}>"

    def add_response_header(self, name: str, value: str) -> None:
        """Add a header to whatever response goes back. CR, LF and NUL are
        refused (ValueError): a plugin must not be able to split a response."""
        if not _TOKEN.match(name):
            raise ValueError(f"not a header name: {name!r}")
        headers = Headers()
        headers.add(name, value)  # checks the value
        self.response_headers.extend(headers.raw)


class Plugin(Generic[C]):
    """Base class of every plugin. Override the phases you need."""

    name: ClassVar[str]
    priority: ClassVar[int]
    Config: ClassVar[type[msgspec.Struct]] = NoConfig
    #: True if ``response`` reads or replaces the body (it is then buffered,
    #: up to ``max_buffer_bytes``).
    buffers_response: bool = False
    max_buffer_bytes: int = 1 << 20

    def __init__(self, config: C, env: PluginEnv) -> None:
        self.config = config
        self.env = env

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} priority={self.priority}>"

    async def access(self, ctx: Context) -> Response | None:
        return None

    async def upstream(self, ctx: Context, call_next: CallNext) -> Response:
        return await call_next()

    async def response(self, ctx: Context, response: Response) -> None:
        return None

    async def log(self, ctx: Context, response: Response) -> None:
        return None

    def wants_body(self, ctx: Context, response: Response) -> bool:
        """With ``buffers_response``: should this response's body be
        buffered for the ``response`` phase? Say no to what you will not edit,
        so it streams. Gateway-made responses (errors) are never offered."""
        return True

    def bind(self, route: Any, upstream: Any) -> None:
        """Once per route and config load, before any request (see above)."""
        return None

    @classmethod
    def binds(cls) -> bool:
        return cls.bind is not Plugin.bind

    @classmethod
    def phases(cls) -> tuple[str, ...]:
        """The phases this plugin overrides (only those are run)."""
        return tuple(p for p in PHASES if getattr(cls, p) is not getattr(Plugin, p))
