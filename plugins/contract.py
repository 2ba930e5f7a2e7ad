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
    wrapper; a plugin with ``wraps_each_try = True`` wraps each single try
    instead (innermost, inside ``retry``).

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

**Synchronous forms.** A phase whose work never waits (most: checking a
header, counting, adding a header) may be written as a plain method named
``access_nowait(ctx)``, ``response_nowait(ctx, response)`` or
``log_nowait(ctx, response)`` instead of (or besides) the ``async`` one: the
gateway then calls it directly, without making and awaiting a coroutine per
request, and ``await plugin.access(ctx)`` still works (the default
``access`` runs ``access_nowait``). Such a method returns what the async
phase would (``access_nowait``: a ``Response`` or ``None``), or, when it must
wait after all (rarely: key-auth moving a key to a rotated secret), an
awaitable that the gateway awaits. ``settle(value)`` awaits a value that may
be either.

Besides the phases, ``bind(route, upstream)`` is called once per route when
a config is loaded, with the route's ``RouteView`` and its ``UpstreamView``:
the place to check settings that depend on the route, to precompute per
route, or to ask something of the upstream (the circuit breaker asks for a
breaker on each target with ``upstream.use_breaker``). A ``ValueError``
raised there is a load error naming the plugin and the route; nothing of a
refused config takes effect.

``background()`` is work a plugin does off the request path (the ``jwt``
plugin fetching a JWKS): the gateway runs it as a task owned by the config's
pipeline, from when the config serves until a reload replaces it or the
gateway stops, and cancels it then. It handles its own failures; an
exception that escapes it is logged and ends that task only.

What a plugin gets from the gateway is typed and lives here: ``Context``
(one request: the route, the key, the upstream call's ``upstream``,
``tried_targets``, ``retries`` and ``upstream_seconds``), ``RouteView``,
``Consumer``, ``UpstreamView``, and ``PluginEnv`` with the services as
Protocols (``KeyValidator``, ``Limiter``). Refusals are the
``GatewayError`` classes of ``triogate.errors``. Besides this module a
plugin may use ``triogate.errors``, ``triogate.http`` (the message model)
and the pure decision modules ``triogate.policy.*``; the built-in plugins
import nothing else of triogate (a test checks it).

Priorities (higher runs first), in bands as in Kong:

====================  ========  ============================================
band                  priority  built-ins
====================  ========  ============================================
tracing               >= 10000  request-id (100000)
edge / filtering      2000-9999 ip-restriction (3000), cors (2000)
limits on the request 1400-1999 request-size-limiting (1500)
authentication        1000-1399 jwt (1300), key-auth (1250)
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

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, TypeVar, cast

import msgspec

from triogate.config import RateLimitConfig
from triogate.errors import GatewayError
from triogate.http import Body, Headers, Request, Response
from triogate.plugins._api_context import Consumer, Context, RouteView, Subject, UpstreamView
from triogate.plugins._api_services import KeyValidator, Limiter, PluginEnv, TracerSource
from triogate.policy.breaker import BreakerSettings, FailurePolicy
from triogate.policy.keyaccess import KeyRule
from triogate.policy.ratelimit import Decision, Limit

__all__ = [
    "PHASES",
    "Body",
    "BreakerSettings",
    "CallNext",
    "Consumer",
    "Context",
    "Decision",
    "FailurePolicy",
    "GatewayError",
    "Headers",
    "KeyRule",
    "KeyValidator",
    "Limit",
    "Limiter",
    "NoConfig",
    "Plugin",
    "PluginEnv",
    "RateLimitConfig",
    "Request",
    "Response",
    "RouteView",
    "Subject",
    "TracerSource",
    "UpstreamView",
    "settle",
]

PHASES = ("access", "upstream", "response", "log")


class NoConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """For plugins that take no settings."""


C = TypeVar("C", bound=msgspec.Struct)

CallNext = Callable[[], Awaitable[Response]]


class Plugin(Generic[C]):
    """Base class of every plugin. Override the phases you need."""

    name: ClassVar[str]
    priority: ClassVar[int]
    Config: ClassVar[type[msgspec.Struct]] = NoConfig
    #: True if ``response`` reads or replaces the body (it is then buffered,
    #: up to ``max_buffer_bytes``).
    buffers_response: bool = False
    max_buffer_bytes: int = 1 << 20
    #: True: the ``upstream`` wrapper runs around each single try of the
    #: upstream call, innermost (inside ``retry``), whatever the priority
    #: (``tracing``'s span per try). Decided when the chain is built.
    wraps_each_try: ClassVar[bool] = False

    def __init__(self, config: C, env: PluginEnv) -> None:
        self.config = config
        self.env = env

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} priority={self.priority}>"

    async def access(self, ctx: Context) -> Response | None:
        nowait = getattr(self, "access_nowait", None)
        if nowait is None:
            return None
        return await settle(cast("Response | Awaitable[Response | None] | None", nowait(ctx)))

    async def upstream(self, ctx: Context, call_next: CallNext) -> Response:
        return await call_next()

    async def response(self, ctx: Context, response: Response) -> None:
        nowait = getattr(self, "response_nowait", None)
        if nowait is not None:
            await settle(cast("Awaitable[None] | None", nowait(ctx, response)))

    async def log(self, ctx: Context, response: Response) -> None:
        nowait = getattr(self, "log_nowait", None)
        if nowait is not None:
            await settle(cast("Awaitable[None] | None", nowait(ctx, response)))

    def wants_body(self, ctx: Context, response: Response) -> bool:
        """With ``buffers_response``: should this response's body be
        buffered for the ``response`` phase? Say no to what you will not edit,
        so it streams. Gateway-made responses (errors) are never offered."""
        return True

    def bind(self, route: RouteView, upstream: UpstreamView) -> None:
        """Once per route and config load, before any request (see above)."""
        return None

    async def background(self) -> None:
        """Off the request path, while this plugin's config serves (above)."""
        return None

    @classmethod
    def binds(cls) -> bool:
        return cls.bind is not Plugin.bind

    @classmethod
    def has_background(cls) -> bool:
        return cls.background is not Plugin.background

    @classmethod
    def phases(cls) -> tuple[str, ...]:
        """The phases this plugin overrides, in either form (only those
        are run)."""
        return tuple(
            p
            for p in PHASES
            if getattr(cls, p) is not getattr(Plugin, p) or hasattr(cls, f"{p}_nowait")
        )

    def phase(self, name: str) -> Callable[..., Any]:
        """What the gateway calls for phase ``name``: the synchronous form
        when there is one, else the async method."""
        nowait: Callable[..., Any] | None = getattr(self, f"{name}_nowait", None)
        return nowait if nowait is not None else cast("Callable[..., Any]", getattr(self, name))


T = TypeVar("T")


async def settle(value: T | Awaitable[T]) -> T:
    """``value``, awaited if it is awaitable: what a synchronous phase form
    returned, for a test or a wrapper that calls one directly."""
    if inspect.isawaitable(value):
        return await value
    return value
