"""The plugin API's types: the typed Context, the RouteView, the services
PluginEnv lends as Protocols (with stand-ins when there is no gateway), and
the gateway's adapters behind them (key verdicts as error types)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from tests.conftest import FakeClock
from triogate.config import RouteConfig
from triogate.control.audit import Actor
from triogate.control.keyresolve import KeyResolver
from triogate.control.models import CreateKeyRequest
from triogate.dataplane.plugin_services import ActorLimiter, KeyValidation, plugin_env
from triogate.errors import (
    InsufficientScope,
    InternalError,
    InvalidKey,
    KeyExpired,
    KeyRevoked,
    MissingKey,
    QuotaExceeded,
    RateLimited,
)
from triogate.plugins.contract import (
    Consumer,
    Context,
    KeyValidator,
    Limit,
    Limiter,
    PluginEnv,
    RouteView,
    UpstreamView,
)
from triogate.plugins.key_auth import KeyAuth
from triogate.plugins.rate_limit import RateLimit
from triogate.runtime.gateway import Gateway
from triogate.storage import Credits
from triogate.testing import key_record, make_context, route_view

ACTOR = Actor("test")


# ---- the context ---------------------------------------------------------------


def test_context_has_typed_fields_for_the_upstream_call() -> None:
    ctx = make_context("GET", "/x")
    assert ctx.upstream is None and ctx.tried_targets is None
    assert ctx.retries == 0 and ctx.upstream_seconds is None
    assert ctx.route is not None and ctx.route.name == "test"
    assert "route=test" in repr(ctx)


def test_state_is_made_on_first_use_and_kept() -> None:
    ctx = make_context()
    assert ctx._state is None  # most requests never pay for a dict
    ctx.state["my-plugin.seen"] = True
    assert ctx.state == {"my-plugin.seen": True}


def test_route_view_of_a_route_config() -> None:
    route = msgspec.convert(
        {"name": "users", "path": "/users/{id}", "upstream": "api", "methods": ["GET"]},
        RouteConfig,
    )
    view = RouteView.of(route, 3)
    assert view == RouteView("users", 3, "/users/{id}", "api", None, frozenset({"GET"}), None)
    assert RouteView.of(msgspec.structs.replace(route, methods=[]), 0).methods is None
    with pytest.raises(AttributeError):
        view.name = "other"  # type: ignore[misc]
    assert route_view(methods=["GET"]).methods == frozenset({"GET"})


# ---- the services' stand-ins -------------------------------------------------------


async def test_an_env_without_a_gateway_knows_no_key_and_admits_everything() -> None:
    env = PluginEnv()
    with pytest.raises(InternalError):
        env.keys.check_nowait("tg_whatever", ())
    ctx = make_context()
    env.limiter.admit_key_nowait(ctx, key_record(), 1)
    env.limiter.admit_nowait(ctx, "ip:x", Limit("l", 1, 1.0), 1000, key=False)
    env.limiter.record_nowait(key_record(), 200)
    assert ctx.rate_limits == [] and ctx.undo == []
    with pytest.raises(InternalError):
        await KeyAuth(KeyAuth.Config(), env).access(make_context(headers=[("x-api-key", "k")]))


class FakeKeys:
    """A third party's own key store, behind the same Protocol."""

    def __init__(self, known: dict[str, Consumer]) -> None:
        self.known = known
        self.reindexed: list[str] = []

    def check_nowait(self, key: str, required_scopes: tuple[str, ...]) -> tuple[Consumer, bool]:
        if key not in self.known:
            raise InvalidKey("unknown")
        return self.known[key], key == "old"

    async def reindex(self, key: str, key_id: str) -> None:
        self.reindexed.append(key_id)


class CountingLimiter:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def admit_key_nowait(self, ctx: Context, consumer: Consumer, cost: int) -> None:
        self.calls.append(("key", consumer.id, cost))

    def admit_nowait(
        self, ctx: Context, subject: str, limit: Limit, cost: int, *, key: bool
    ) -> None:
        self.calls.append(("limit", subject, limit.state_key, cost, key))

    def record_nowait(self, consumer: Consumer, status: int) -> None:
        self.calls.append(("usage", consumer.id, status))


async def test_key_auth_works_on_any_key_validator_and_limiter() -> None:
    keys: KeyValidator = FakeKeys({"new": key_record("key_a"), "old": key_record("key_b")})
    limiter = CountingLimiter()
    typed: Limiter = limiter
    plugin = KeyAuth(KeyAuth.Config(cost=2), PluginEnv(keys=keys, limiter=typed))
    ctx = make_context(headers=[("authorization", "Bearer old"), ("x-other", "1")])
    assert await plugin.access(ctx) is None
    assert ctx.consumer is not None and ctx.consumer.id == "key_b"
    assert ctx.request.headers.get("authorization") is None  # hidden from the upstream
    assert isinstance(keys, FakeKeys) and keys.reindexed == ["key_b"]
    await plugin.log(ctx, make_response(204))
    assert limiter.calls == [("key", "key_b", 2), ("usage", "key_b", 204)]
    with pytest.raises(InvalidKey):
        await plugin.access(make_context(headers=[("x-api-key", "nope")]))
    with pytest.raises(MissingKey):
        await plugin.access(make_context())


def make_response(status: int) -> Any:
    from triogate.http import Response

    return Response(status)


async def test_rate_limit_builds_its_policy_once_per_route_in_bind() -> None:
    limiter = CountingLimiter()
    plugin = RateLimit(
        RateLimit.Config(limit=5, period_seconds=1, by="ip"), PluginEnv(limiter=limiter)
    )

    class NoUpstream:
        name = "api"
        targets = ("http://127.0.0.1:9",)

        def begin_retry(self, ratio: float, minimum: int) -> bool:
            return False

        def end_retry(self) -> None:
            return None

        def use_breaker(self, settings: Any, failures: Any) -> None:
            raise AssertionError("rate-limit asks for no breaker")

    upstream: UpstreamView = NoUpstream()
    plugin.bind(route_view("orders"), upstream)
    limit = plugin._limit
    await plugin.access(make_context(client_ip="10.0.0.1"))
    await plugin.access(make_context(client_ip="10.0.0.2"))
    assert plugin._limit is limit  # nothing built per request
    assert limiter.calls == [
        ("limit", "ip:orders:10.0.0.1", "route:orders:route-ip", 1, False),
        ("limit", "ip:orders:10.0.0.2", "route:orders:route-ip", 1, False),
    ]


# ---- the gateway's adapters ----------------------------------------------------------


async def test_key_validation_raises_the_verdict_as_its_error_type(
    memory_gateway: Gateway, clock: FakeClock
) -> None:
    gw = memory_gateway
    keys = KeyValidation(gw.keys, KeyResolver(gw.store))
    created = await gw.keys.create(
        CreateKeyRequest(
            name="n",
            owner="o",
            scopes=["orders:read"],
            expires_at=datetime.fromtimestamp(clock.now + 60, UTC),
        ),
        ACTOR,
    )
    record, stale = keys.check_nowait(created.key, ("orders:read",))
    assert record.id == created.id and stale is False
    with pytest.raises(InsufficientScope) as scope:
        keys.check_nowait(created.key, ("orders:write",))
    assert scope.value.extra["required_scopes"] == ["orders:write"]
    with pytest.raises(InvalidKey):
        keys.check_nowait("tg_not_a_key", ())
    clock.advance(61)
    with pytest.raises(KeyExpired):
        keys.check_nowait(created.key, ())
    other = await gw.keys.create(CreateKeyRequest(name="n", owner="o"), ACTOR)
    await gw.keys.revoke(other.id, ACTOR)
    with pytest.raises(KeyRevoked) as revoked:
        keys.check_nowait(other.key, ())
    assert revoked.value.detail == "the API key has been revoked"


async def test_actor_limiter_refuses_with_retry_after_and_undoes(memory_gateway: Gateway) -> None:
    gw = memory_gateway
    env = plugin_env(keys=gw.keys, actors=gw.actors, clock=gw.clock)
    assert isinstance(env.limiter, ActorLimiter)
    record = key_record("key_q", credits=Credits(remaining=1))
    first = make_context()
    env.limiter.admit_key_nowait(first, record, 1)
    assert len(first.undo) == 1
    with pytest.raises(QuotaExceeded) as quota:
        env.limiter.admit_key_nowait(make_context(), record, 1)
    assert quota.value.headers["Retry-After"] == "3600"  # credits that never refill
    first.undo[0]()  # the first request was refused later: its credit comes back
    env.limiter.admit_key_nowait(make_context(), record, 1)
    limit = Limit("route-ip", 1, 60.0)
    ctx = make_context()
    env.limiter.admit_nowait(ctx, "ip:r:1.2.3.4", limit, 1, key=False)
    assert [d.limit for d in ctx.rate_limits] == [limit] and len(ctx.undo) == 1
    with pytest.raises(RateLimited):
        env.limiter.admit_nowait(make_context(), "ip:r:1.2.3.4", limit, 1, key=False)
