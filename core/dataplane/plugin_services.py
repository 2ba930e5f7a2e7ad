"""The gateway's side of the plugin API: the services ``PluginEnv`` lends.

``triogate.plugins.contract`` declares what a plugin may ask (Protocols);
this module answers with the gateway's own objects: the key service
(``KeyValidation``) and the per-key actors (``ActorLimiter``).
``plugin_env`` builds the environment the gateway hands every plugin. The
live ``Upstream`` is the request-time ``UpstreamView`` itself, and the plan's
``UpstreamBinder`` the bind-time one (``triogate.dataplane.plan``).

Key-auth and rate-limit call these on every request: each method does what
the plugins did themselves before (the same calls into the key service and
the actors, no extra object per request); plugins bind the methods once.

A key with a plan, an identity or roles is resolved (``control.keyresolve``:
one read snapshot of the key, its plan, roles and identity) and becomes the
request's consumer as a ``KeyAccess``; its admission, with the identity's
shared pool, is ``keyadmit``'s. A key with none of them is its own record,
decided and admitted as before: no extra read, no extra object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from triogate.control.keyresolve import KeyAccess, KeyResolver
from triogate.control.keyrules import scopes_refused
from triogate.dataplane.history import count_refused, outcome_of
from triogate.dataplane.keyactor import Refusal
from triogate.dataplane.keyadmit import Grant, LimitTables, grant, lowest_balance
from triogate.errors import (
    KEY_ERRORS,
    GatewayError,
    InsufficientScope,
    InvalidKey,
    KeyDisabled,
    KeyVerdict,
    QuotaExceeded,
    RateLimited,
)
from triogate.plugins.contract import Consumer, Context, PluginEnv, TracerSource
from triogate.policy.keyaccess import KeyRule
from triogate.policy.ratelimit import Limit
from triogate.policy.refill import NEVER, retry_after
from triogate.storage import KeyRecord

if TYPE_CHECKING:
    from triogate.control.keyresolve import CreditsFrom
    from triogate.control.keys import KeyService
    from triogate.dataplane.actors import ActorRegistry
    from triogate.dataplane.keyactor import KeyActor
    from triogate.events.live import LiveEvents

__all__ = [
    "NO_REFILL_RETRY_AFTER",
    "ActorLimiter",
    "KeyValidation",
    "credits_header",
    "plugin_env",
]


def _refusal(verdict: KeyVerdict, consumer: Consumer | None, rule: KeyRule) -> GatewayError:
    """The verdict on a key as the error that refuses the request
    (``triogate.errors.KEY_ERRORS``); a scope refusal names what is missing
    (of ``any_scopes``: every one, as one of them is needed)."""
    if verdict is KeyVerdict.INSUFFICIENT_SCOPE and consumer is not None:
        missing = scopes_refused(consumer.scopes, rule)
        if rule.scopes and missing and missing[0] in rule.scopes:
            detail = f"the key lacks the scopes {', '.join(missing)}"
        else:
            detail = f"the key has none of the scopes {', '.join(missing)}"
        return InsufficientScope(detail, required_scopes=missing)
    if (
        verdict is KeyVerdict.KEY_DISABLED
        and isinstance(consumer, KeyAccess)
        and consumer.record.enabled
    ):
        return KeyDisabled("the identity the API key belongs to is disabled")
    cls, detail = KEY_ERRORS[verdict]
    return cls(detail)


_rules: dict[tuple[str, ...], KeyRule] = {}


def _scopes_rule(required: tuple[str, ...]) -> KeyRule:
    # One rule per scope list a route asks (a bounded set): none per request.
    rule = _rules.get(required)
    if rule is None:
        if len(_rules) >= 4096:
            _rules.clear()
        rule = _rules[required] = KeyRule(scopes=required)
    return rule


class KeyValidation:
    """``KeyValidator`` over the key service: a synchronous read (checksum,
    HMAC digest, two LMDB lookups), so a key revoked or rotated from any
    process is refused on the very next request. A key with a plan, an
    identity or roles is resolved in one more read snapshot."""

    __slots__ = ("_actors", "_events", "_keys", "_lookup", "_resolver", "_validate", "reindex")

    def __init__(
        self,
        keys: KeyService,
        resolver: KeyResolver,
        events: LiveEvents | None = None,
        actors: ActorRegistry | None = None,
    ) -> None:
        # Where a known key's refusal is counted (usage history ``invalid``).
        self._actors = actors
        # Told of expired keys refused (``key.expired``), when a webhook wants it.
        self._events = events if events is not None and events.wants_expired else None
        # The key service's own clock decides expiry and grace: one source
        # of "now" for the admin API's validate and the data plane.
        self._keys = keys
        self._validate = keys.validate_nowait
        self._lookup = keys.lookup_nowait
        self._resolver = resolver
        self.reindex = keys.reindex

    def __repr__(self) -> str:
        return "<KeyValidation>"

    def check_nowait(self, key: str, required_scopes: tuple[str, ...]) -> tuple[Consumer, bool]:
        record, verdict, stale = self._validate(key, required_scopes)
        if record is None:
            raise InvalidKey(KEY_ERRORS[KeyVerdict.INVALID_KEY][1])
        if record.identity_id is None and record.plan_id is None and not record.roles:
            if verdict is not None:
                if verdict is KeyVerdict.KEY_EXPIRED and self._events is not None:
                    self._events.expired(record.id)
                error = _refusal(verdict, record, _scopes_rule(required_scopes))
                raise self._refused(error, record, None)
            return record, stale
        # Its plan and roles may grant the scopes its own lack: decided
        # again on the effective ones.
        return self._decide(record, stale, _scopes_rule(required_scopes))

    def authorize_nowait(self, key: str, rule: KeyRule) -> tuple[Consumer, bool]:
        record, stale = self._lookup(key)
        if record is None:
            raise InvalidKey(KEY_ERRORS[KeyVerdict.INVALID_KEY][1])
        return self._decide(record, stale, rule)

    def _decide(self, record: KeyRecord, stale: bool, rule: KeyRule) -> tuple[Consumer, bool]:
        consumer, verdict = self._resolver.decide(record, self._keys._clock(), rule)
        if verdict is not None or consumer is None:
            if verdict is KeyVerdict.KEY_EXPIRED and self._events is not None:
                self._events.expired(record.id)
            error = _refusal(verdict or KeyVerdict.INVALID_KEY, consumer, rule)
            raise self._refused(error, record, consumer)
        return consumer, stale

    def _refused(
        self, error: GatewayError, record: KeyRecord, consumer: Consumer | None
    ) -> GatewayError:
        """Count a known key's refusal in its (and its identity's) usage
        history as ``invalid``; a key of another keyspace (``INVALID_KEY``)
        is unknown on this route, so not counted."""
        if self._actors is not None and error.code != "INVALID_KEY":
            identity = consumer.identity if type(consumer) is KeyAccess else None
            count_refused(
                self._actors, record.id, None if identity is None else identity.id, error.status
            )
        return error


NO_REFILL_RETRY_AFTER = NEVER  # credits that never refill: "not soon"
_X_CREDITS = b"x-credits-remaining"


def credits_header(ctx: Context, balance: int) -> None:
    """``X-Credits-Remaining`` (metered keys only: no string work for others)."""
    ctx.response_headers.append((_X_CREDITS, str(balance).encode()))


class ActorLimiter:
    """``Limiter`` over the actors: a key's state in its persisted actor
    (that of its rotation chain's first key), an identity's pool in the
    identity's, an address's or a route's in an unpersisted subject actor."""

    __slots__ = ("_actors", "_clock", "_events", "_tables", "default_key_limit")

    def __init__(
        self,
        actors: ActorRegistry,
        default_key_limit: Limit | None = None,
        events: LiveEvents | None = None,
    ) -> None:
        # Told of credits spent and rate-limit refusals (``events.live``).
        self._events = events
        self._actors = actors
        self._clock = actors.clock
        self._tables = LimitTables()
        self.default_key_limit = default_key_limit

    def __repr__(self) -> str:
        return f"<ActorLimiter {self._actors!r}>"

    def admit_key_nowait(self, ctx: Context, consumer: Consumer, cost: int) -> None:
        if type(consumer) is KeyAccess:
            self._admit_access(ctx, consumer, cost)
            return
        # Else a key record itself (KeyValidation makes no other consumer).
        record: KeyRecord = consumer  # type: ignore[assignment]
        actors = self._actors
        actor = actors.actor(record.state_key)
        limits = actor.key_limits(record, self.default_key_limit)
        for spec in record.rate_limits:
            if spec.routes:  # route-bound: only those of this route apply
                limits = self._tables.get(record.rate_limits).on(_route(ctx))
                break
        if not limits and record.credits is None:
            return
        now = self._clock()
        admission = actor.admit_nowait(limits, now, cost=cost, record=record, use_credits=True)
        ctx.rate_limits.extend(admission.decisions)
        if record.credits is not None:
            left = admission.credits_left
            if admission.code is Refusal.QUOTA_EXCEEDED or left is None:
                left = 0
            credits_header(ctx, left)
        if not admission.allowed:
            if admission.code == "QUOTA_EXCEEDED":
                raise _quota(record, actor, now, "the key has no credits left")
            if self._events is not None:
                self._events.rate_limited(record.id)
            raise RateLimited("the key's rate limit is exhausted; see Retry-After")
        if self._events is not None and admission.credits_taken:
            self._events.spent(record.id, record.credits, admission.credits_left, cost)
        clock = self._clock
        ctx.undo.append(lambda: actor.undo_nowait(admission, clock()))

    def _admit_access(self, ctx: Context, access: KeyAccess, cost: int) -> None:
        """A key with a plan, an identity or roles: its effective limits and
        credits, with its identity's pool, all-or-nothing (``keyadmit``)."""
        actors = self._actors
        route = _route(ctx)
        key_actor = actors.actor(access.state_key)
        items: list[tuple[KeyActor, Limit]] = []
        if access.rate_limits:
            items.extend((key_actor, lim) for lim in self._tables.get(access.rate_limits).on(route))
        elif self.default_key_limit is not None:
            items.append((key_actor, self.default_key_limit))
        credits: list[tuple[KeyActor, CreditsFrom]] = []
        if access.credits is not None:
            credits.append((key_actor, access.credits))
        pool = access.pool
        identity = access.identity
        if pool is not None and identity is not None:
            pool_actor = actors.actor(identity.id)
            if pool.rate_limits:
                table = self._tables.get(pool.rate_limits)
                items.extend((pool_actor, lim) for lim in table.on(route))
            if access.pool_credits is not None:
                credits.append((pool_actor, access.pool_credits))
        if not items and not credits:
            return
        now = self._clock()
        result = grant(actors, items, credits, now, cost)
        ctx.rate_limits.extend(result.decisions)
        if credits:
            credits_header(ctx, 0 if result.short is not None else lowest_balance(credits))
        if not result.allowed:
            if result.short is not None:
                actor, source = result.short
                whose = "the key" if actor is key_actor else "the key's identity"
                raise _quota(source, actor, now, f"{whose} has no credits left")
            if self._events is not None:
                self._events.rate_limited(access.id)
            raise RateLimited("the key's rate limit is exhausted; see Retry-After")
        if self._events is not None and result.taken:
            _spent(self._events, access, key_actor, credits, result.taken, cost)
        clock = self._clock
        ctx.undo.append(lambda: _undo(result, clock(), cost))

    def key_route_admission(
        self, limit: Limit, route_cost: int
    ) -> Callable[[Context, Consumer, int], None] | None:
        """Plan time: ``admit_key_nowait`` and then ``admit_nowait`` of the
        route's ``limit`` by key, in one step (``keyroute``); None on a
        cluster node (its decisions are Redis's)."""
        if self._actors.cluster is not None:
            return None
        from triogate.dataplane.keyroute import KeyRouteAdmission

        return KeyRouteAdmission(self, limit, route_cost).admit

    def admit_nowait(
        self, ctx: Context, subject: str, limit: Limit, cost: int, *, key: bool
    ) -> None:
        actors = self._actors
        actor = actors.actor(subject) if key else actors.subject(subject)
        admission = actor.admit_nowait((limit,), self._clock(), cost=cost)
        ctx.rate_limits.extend(admission.decisions)
        if not admission.allowed:
            if key and self._events is not None and ctx.consumer is not None:
                self._events.rate_limited(ctx.consumer.id)
            raise RateLimited("the route's rate limit is exhausted; see Retry-After")
        clock = self._clock
        ctx.undo.append(lambda: actor.undo_nowait(admission, clock()))

    def record_nowait(self, consumer: Consumer, status: int) -> None:
        self.record_outcome_nowait(consumer, status, None)

    def record_outcome_nowait(self, consumer: Consumer, status: int, code: str | None) -> None:
        """Count an answered request in the key's (and its identity's) usage
        and usage history; ``code``: the answer's problem code, None for
        the upstream's (``history.outcome_of``)."""
        actors = self._actors
        now = self._clock()
        outcome = outcome_of(status, code)
        actors.actor(consumer.id).record_nowait(status, now, outcome)
        if type(consumer) is KeyAccess and consumer.identity is not None:
            # The identity's usage: the sum of its keys', counted as it goes.
            actors.actor(consumer.identity.id).record_nowait(status, now, outcome)


def _route(ctx: Context) -> str:
    route = ctx.route
    return route.name if route is not None else ""


def _spent(
    events: LiveEvents,
    access: KeyAccess,
    key_actor: KeyActor,
    credits: list[tuple[KeyActor, CreditsFrom]],
    taken: list[KeyActor],
    cost: int,
) -> None:
    """Tell ``events`` each balance the request took from (``credits.low``)."""
    for actor, source in credits:
        if actor in taken:
            pool = access.identity if actor is not key_actor else None
            events.spent(
                access.id, source.credits, actor.credits, cost, None if pool is None else pool.id
            )


def _undo(result: Grant, now: float, cost: int) -> None:
    result.undo(now, cost)


def _quota(source: CreditsFrom, actor: KeyActor, now: float, detail: str) -> QuotaExceeded:
    error = QuotaExceeded(detail, credits_remaining=0)
    error.headers["Retry-After"] = str(retry_after(source.credits, actor.credits_refilled_at, now))
    return error


def plugin_env(
    *,
    keys: KeyService,
    actors: ActorRegistry,
    clock: Callable[[], float],
    default_key_limit: Limit | None = None,
    keyspaces: frozenset[str] | None = None,
    events: LiveEvents | None = None,
    tracers: TracerSource | None = None,
) -> PluginEnv:
    """The environment the gateway hands every plugin of a config."""
    limiter = ActorLimiter(actors, default_key_limit, events)
    if actors.cluster is not None:  # a cluster node: decisions in Redis
        from triogate.dataplane.clusterlimiter import ClusterLimiter

        limiter = ClusterLimiter(actors, actors.cluster, default_key_limit, events)
    env = PluginEnv(
        keys=KeyValidation(keys, KeyResolver(actors.store), events, actors),
        limiter=limiter,
        clock=clock,
        keyspaces=keyspaces,
    )
    if tracers is not None:
        env.tracers = tracers
    return env
