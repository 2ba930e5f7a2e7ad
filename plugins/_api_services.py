"""The plugin API, part 2: what the gateway lends a plugin (``PluginEnv``).

Private module: plugin authors import these names from
``triogate.plugins.contract``.

The services are Protocols: a plugin knows what it may ask, never which
object answers (the gateway's adapters live in
``triogate.dataplane.plugin_services``). Every service is always there: an
environment made without the gateway (``PluginEnv()``, as in a unit test or
``triogate check-config``) has stand-ins that admit everything and know no
key. Hot-path methods are synchronous (``_nowait``): a plugin binds them
once in ``__init__`` (``self._admit = env.limiter.admit_nowait``) and calls
them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from triogate.errors import InternalError
from triogate.plugins._api_context import Consumer, Context
from triogate.policy.keyaccess import KeyRule
from triogate.policy.ratelimit import Limit

__all__ = ["KeyValidator", "Limiter", "PluginEnv", "TracerSource"]


class KeyValidator(Protocol):
    """API keys, checked against the key store."""

    def check_nowait(self, key: str, required_scopes: tuple[str, ...]) -> tuple[Consumer, bool]:
        """The key's record, if it may be used now for ``required_scopes``,
        and whether it wants ``reindex`` (found under an older HMAC secret).
        The verdict on a refused key is the error raised, ready to raise on:
        ``InvalidKey`` (malformed or unknown), ``KeyRevoked``, ``KeyExpired``,
        ``KeyRotated`` (401), or ``InsufficientScope`` (403, naming the
        missing scopes) from ``triogate.errors``. Reads only."""
        ...

    def authorize_nowait(self, key: str, rule: KeyRule) -> tuple[Consumer, bool]:
        """``check_nowait`` for a route's whole ``KeyRule``: besides its
        ``scopes``, one of ``any_scopes``, none of ``deny_roles``
        (``RoleDenied``, 403) and its ``keyspace`` (a key of another is
        ``InvalidKey``). The gateway's also refuses a disabled key
        (``KeyDisabled``, 403)."""
        ...

    async def reindex(self, key: str, key_id: str) -> None:
        """Index the key under the current HMAC secret (once per key after a
        secret rotation)."""
        ...


class Limiter(Protocol):
    """Rate limits and credits, decided synchronously on state the gateway
    owns (per key, per address, per route). An admission records its
    decisions in ``ctx.rate_limits`` (for the ``RateLimit`` headers) and
    what gives it back in ``ctx.undo`` (run if the gateway refuses the
    request before any byte of it went upstream); a refusal raises
    ``RateLimited`` or ``QuotaExceeded`` (429, with ``Retry-After``).

    The admissions may return an awaitable instead of None: a cluster
    node's limiter decides in Redis (``triogate.cluster``), and the refusal
    is then raised by awaiting it. A caller returns it from its
    ``access_nowait`` (the gateway awaits it); a limiter that always returns
    None stays valid."""

    def admit_key_nowait(
        self, ctx: Context, consumer: Consumer, cost: int
    ) -> Awaitable[None] | None:
        """The key's own limits (or the configured default) and ``cost``
        credits, all-or-nothing, in its ``state_key``'s state."""
        ...

    def admit_nowait(
        self, ctx: Context, subject: str, limit: Limit, cost: int, *, key: bool
    ) -> Awaitable[None] | None:
        """``cost`` units of ``limit`` for ``subject``: whose requests count
        together. ``key=True``: ``subject`` is a key's ``state_key`` and the
        state is kept with the key's (persisted); else any string (an
        address, a route) whose state lives in memory."""
        ...

    def record_nowait(self, consumer: Consumer, status: int) -> None:
        """Count a request in the key's usage (by status class). The
        gateway's limiter also has ``record_outcome_nowait(consumer, status,
        code)`` (``code``: the answer's problem code, None for the upstream's),
        which key-auth calls when a limiter has it: the usage history's
        outcome."""
        ...


class _NoKeys:
    """No key store: every key check is a bug in the setup (500)."""

    def check_nowait(self, key: str, required_scopes: tuple[str, ...]) -> tuple[Consumer, bool]:
        raise InternalError("no key store: key checks need the gateway's services")

    def authorize_nowait(self, key: str, rule: KeyRule) -> tuple[Consumer, bool]:
        raise InternalError("no key store: key checks need the gateway's services")

    async def reindex(self, key: str, key_id: str) -> None:
        return None


class _NoLimits:
    """No limiter: everything is admitted, nothing is counted."""

    def admit_key_nowait(self, ctx: Context, consumer: Consumer, cost: int) -> None:
        return None

    def admit_nowait(
        self, ctx: Context, subject: str, limit: Limit, cost: int, *, key: bool
    ) -> None:
        return None

    def record_nowait(self, consumer: Consumer, status: int) -> None:
        return None


class TracerSource(Protocol):
    """OpenTelemetry tracers, one provider per export setting, owned by the
    gateway (flushed and shut down when it stops). Typed ``Any``: the SDK is
    an optional extra (``triogate[otel]``) the contract does not import."""

    def tracer(self, settings: Any) -> Any:
        """An ``opentelemetry.trace.Tracer`` exporting as ``settings`` (the
        ``tracing`` plugin's config) say; None: no export here (a stand-in)."""
        ...


class _NoTracers:
    """No gateway (a unit test, ``check-config``): nothing is exported."""

    def tracer(self, settings: Any) -> Any:
        return None


NO_KEYS: KeyValidator = _NoKeys()
NO_LIMITS: Limiter = _NoLimits()
NO_TRACERS: TracerSource = _NoTracers()


def _no_clock() -> float:
    return 0.0


@dataclass(eq=False)
class PluginEnv:
    """What the gateway lends a plugin. Given to ``__init__``; the same
    environment serves every plugin of a config."""

    keys: KeyValidator = NO_KEYS
    limiter: Limiter = NO_LIMITS
    #: Wall-clock seconds (the gateway's clock; tests may fake it).
    clock: Callable[[], float] = _no_clock
    #: The configured keyspaces' names (``[keyspaces.NAME]`` and ``default``),
    #: for a plugin to refuse a setting naming another; None: not known here.
    keyspaces: frozenset[str] | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("triogate.plugins"))
    #: OpenTelemetry tracers (the ``tracing`` plugin's); a stand-in that
    #: exports nothing when made without the gateway.
    tracers: TracerSource = NO_TRACERS
    #: Anything else an embedding application wants to hand its own plugins.
    extras: dict[str, Any] = field(default_factory=dict)
