"""Unit tests of triogate.dataplane.plugin_loader: entry-point discovery and the checks
on a plugin class, then build_chain (settings, paths in errors, ordering)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint
from typing import Any

import msgspec
import pytest

import triogate.dataplane.plugin_loader as plugin_loader
from triogate.dataplane.plugin_loader import (
    ENTRY_POINT_GROUP,
    Chain,
    PluginSummary,
    _check_plugin,
    build_chain,
    discover,
)
from triogate.errors import PluginLoadError
from triogate.plugins import CallNext, Context, NoConfig, Plugin, PluginEnv, Response
from triogate.plugins.circuit_breaker import CircuitBreaker
from triogate.plugins.cors import Cors
from triogate.plugins.ip_restriction import IpRestriction
from triogate.plugins.jwt_auth import Jwt
from triogate.plugins.key_auth import KeyAuth
from triogate.plugins.rate_limit import RateLimit
from triogate.plugins.request_id import RequestId
from triogate.plugins.request_size import RequestSizeLimiting
from triogate.plugins.retry import Retry
from triogate.plugins.tracing import Tracing
from triogate.plugins.transformers import RequestTransformer, ResponseTransformer

BUILTINS: dict[str, type[Plugin[Any]]] = {
    "request-id": RequestId,
    "ip-restriction": IpRestriction,
    "cors": Cors,
    "request-size-limiting": RequestSizeLimiting,
    "key-auth": KeyAuth,
    "request-transformer": RequestTransformer,
    "response-transformer": ResponseTransformer,
    "rate-limit": RateLimit,
    "retry": Retry,
    "circuit-breaker": CircuitBreaker,
    "tracing": Tracing,
    "jwt": Jwt,
}

# ---- plugin classes for the tests ------------------------------------------------


class Gate(Plugin[NoConfig]):
    name = "gate"
    priority = 10

    async def access(self, ctx: Context) -> Response | None:
        return None


class Wrap(Plugin[NoConfig]):
    name = "wrap"
    priority = 5

    async def upstream(self, ctx: Context, call_next: CallNext) -> Response:
        return await call_next()

    async def log(self, ctx: Context, response: Response) -> None:
        return None


class Low(Gate):
    name = "low"
    priority = 1


class Picky(Gate):
    name = "picky"

    def __init__(self, config: NoConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        raise TypeError("needs a key service")


class WrongName(Gate):
    name = "not-what-the-entry-point-says"


class NoPhases(Plugin[NoConfig]):
    name = "no-phases"
    priority = 1


class LooseConfig(Gate):
    name = "loose-config"

    class Config(msgspec.Struct):  # unknown fields silently accepted: refused
        level: int = 1


class ConfigNotAStruct(Gate):
    name = "config-not-a-struct"
    Config = dict  # type: ignore[assignment]


class NoIntPriority(Gate):
    name = "no-int-priority"
    priority = "high"  # type: ignore[assignment]


class NotAPlugin:
    name = "not-a-plugin"
    priority = 1
    Config = NoConfig

    async def access(self, ctx: Context) -> Response | None:
        return None


def _ep(name: str, obj: str) -> EntryPoint:
    return EntryPoint(name=name, value=f"{__name__}:{obj}", group=ENTRY_POINT_GROUP)


def _chain(
    route: Mapping[str, Mapping[str, Any]],
    global_: Mapping[str, Mapping[str, Any]] | None = None,
    registry: Mapping[str, type[Plugin[Any]]] | None = None,
    env: PluginEnv | None = None,
) -> Chain:
    return build_chain(
        BUILTINS if registry is None else registry,
        global_ or {},
        route,
        env or PluginEnv(),
        route_path="routes[0]",
    )


def _errors(
    route: Mapping[str, Any],
    global_: Mapping[str, Any] | None = None,
    registry: Mapping[str, type[Plugin[Any]]] | None = None,
) -> list[str]:
    with pytest.raises(PluginLoadError) as info:
        _chain(route, global_, registry)
    return info.value.lines()


def _names(chain: Chain) -> list[str]:
    return [p.name for p in chain.plugins]


# ---- discovery ------------------------------------------------------------------


def test_discover_finds_every_builtin() -> None:
    found = discover()
    for name, cls in BUILTINS.items():
        assert found[name] is cls
    builtins = {n for n, c in found.items() if c.__module__.startswith("triogate.plugins.")}
    assert builtins == set(BUILTINS)


def test_discover_uses_the_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[str] = []

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        groups.append(group)
        return [_ep("gate", "Gate"), _ep("wrap", "Wrap")]

    monkeypatch.setattr(plugin_loader, "entry_points", fake_entry_points)
    assert discover() == {"gate": Gate, "wrap": Wrap}
    assert groups == ["triogate.plugins"]


@pytest.mark.parametrize(
    ("ep_name", "attr", "message"),
    [
        (
            "not-what-it-declares",
            "WrongName",
            "declares name 'not-what-the-entry-point-says', expected 'not-what-it-declares'",
        ),
        ("no-phases", "NoPhases", "overrides no phase (access, upstream, response, log) nor bind"),
        (
            "loose-config",
            "LooseConfig",
            "Config must forbid unknown fields (forbid_unknown_fields=True)",
        ),
        ("config-not-a-struct", "ConfigNotAStruct", "Config is not a msgspec.Struct"),
        ("no-int-priority", "NoIntPriority", "has no int priority"),
        ("not-a-plugin", "NotAPlugin", "is not a subclass of triogate.plugins.Plugin"),
    ],
)
def test_a_broken_plugin_is_rejected_naming_it(
    monkeypatch: pytest.MonkeyPatch, ep_name: str, attr: str, message: str
) -> None:
    monkeypatch.setattr(
        plugin_loader, "entry_points", lambda *, group: [_ep("gate", "Gate"), _ep(ep_name, attr)]
    )
    with pytest.raises(PluginLoadError) as info:
        discover()
    assert info.value.lines() == [f"plugin {ep_name}: {message}"]
    assert info.value.source == "plugins"


def test_every_broken_plugin_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        _ep("no-phases", "NoPhases"),
        EntryPoint(name="gone", value="tests.no_such_module:Gone", group=ENTRY_POINT_GROUP),
        _ep("gate", "Gate"),
        _ep("gate", "Low"),
    ]
    monkeypatch.setattr(plugin_loader, "entry_points", lambda *, group: eps)
    with pytest.raises(PluginLoadError) as info:
        discover()
    lines = info.value.lines()
    assert len(lines) == 3
    assert lines[0] == (
        "plugin no-phases: overrides no phase (access, upstream, response, log) nor bind"
    )
    assert lines[1].startswith(
        "plugin gone: failed to load tests.no_such_module:Gone: ModuleNotFoundError("
    )
    assert lines[2] == f"plugin gate: registered twice ({__name__}:Low)"


def test_check_plugin_lists_every_problem() -> None:
    assert _check_plugin("gate", Gate) == []
    assert _check_plugin("key-auth", KeyAuth) == []

    class Bad(Plugin[NoConfig]):
        name = "bad"
        priority = 1.5  # type: ignore[assignment]

        class Config(msgspec.Struct):
            pass

    assert _check_plugin("worse", Bad) == [
        "declares name 'bad', expected 'worse'",
        "has no int priority",
        "Config must forbid unknown fields (forbid_unknown_fields=True)",
        "overrides no phase (access, upstream, response, log) nor bind",
    ]
    not_a_class = Gate(NoConfig(), PluginEnv())
    assert _check_plugin("gate", not_a_class) == ["is not a subclass of triogate.plugins.Plugin"]


# ---- build_chain: settings and errors -------------------------------------------


def test_priority_order_highest_first() -> None:
    chain = _chain(
        {
            "response-transformer": {},
            "key-auth": {},
            "request-transformer": {},
            "request-id": {},
            "request-size-limiting": {"allowed_payload_bytes": 100},
            "cors": {"allow_origins": ["https://app.example"]},
            "ip-restriction": {"allow": ["10.0.0.0/8"]},
        }
    )
    assert _names(chain) == [
        "request-id",
        "ip-restriction",
        "cors",
        "request-size-limiting",
        "key-auth",
        "request-transformer",
        "response-transformer",
    ]
    assert repr(chain) == "<Chain " + " > ".join(_names(chain)) + ">"


def test_global_plugins_join_the_route_and_settings_are_validated() -> None:
    env = PluginEnv()
    chain = _chain({"key-auth": {"scopes": ["users:read"]}}, {"request-id": {}}, env=env)
    assert _names(chain) == ["request-id", "key-auth"]
    key_auth = chain.plugins[1]
    assert isinstance(key_auth, KeyAuth)
    assert key_auth.config == KeyAuth.Config(scopes=["users:read"], hide_credentials=True)
    assert key_auth.env is env


def test_the_route_table_overrides_the_global_one_whole() -> None:
    chain = _chain(
        {"key-auth": {"scopes": ["b:read"]}},
        {"key-auth": {"scopes": ["a:read"], "hide_credentials": False}},
    )
    (key_auth,) = chain.plugins
    assert key_auth.config.scopes == ["b:read"]
    assert key_auth.config.hide_credentials is True  # the default: tables are not merged


def test_unknown_plugin_names_its_path() -> None:
    registry: dict[str, type[Plugin[Any]]] = {"gate": Gate, "wrap": Wrap}
    assert _errors({"nope": {}}, registry=registry) == [
        "routes[0].plugins.nope: unknown plugin 'nope' (installed: gate, wrap)"
    ]
    assert _errors({}, {"nope": {}}, registry=registry) == [
        "plugins.nope: unknown plugin 'nope' (installed: gate, wrap)"
    ]
    assert _errors({"nope": {}}, registry={}) == [
        "routes[0].plugins.nope: unknown plugin 'nope' (installed: none)"
    ]


def test_invalid_settings_have_full_paths() -> None:
    lines = _errors(
        {
            "key-auth": {"scopes": "users:read"},
            "cors": {"max_age_seconds": -1, "colour": "red"},
            "request-size-limiting": {},
            "request-id": [],
        },
        {"ip-restriction": {"allow": "10.0.0.0/8"}},
    )
    assert lines[0].startswith("plugins.ip-restriction.allow: ")
    assert lines[1].startswith("routes[0].plugins.key-auth.scopes: Expected `array`")
    assert "routes[0].plugins.cors.colour: unknown field" in lines
    assert any(line.startswith("routes[0].plugins.cors.max_age_seconds: ") for line in lines)
    assert (
        "routes[0].plugins.request-size-limiting.allowed_payload_bytes: required field is missing"
        in lines
    )
    assert "routes[0].plugins.request-id: expected a table of settings" in lines
    assert len(lines) == 6


def test_nested_settings_paths() -> None:
    assert _errors({"key-auth": {"scopes": ["ok", ""]}}) == [
        "routes[0].plugins.key-auth.scopes[1]: Expected `str` of length >= 1"
    ]


def test_a_plugin_refusing_its_settings_is_a_load_error_naming_it() -> None:
    assert _errors({"cors": {"allow_credentials": True}}) == [
        "routes[0].plugins.cors: plugin 'cors' refused its settings: "
        "allow_credentials cannot be used with allow_origins = ['*']"
    ]
    assert _errors({"ip-restriction": {"allow": ["10.0.0.0/8", "nonsense"]}}) == [
        "routes[0].plugins.ip-restriction: plugin 'ip-restriction' refused its settings: "
        "allow: 'nonsense' is not an IP address or CIDR"
    ]
    assert _errors({"picky": {}}, registry={"picky": Picky}) == [
        "routes[0].plugins.picky: plugin 'picky' refused its settings: needs a key service"
    ]


# ---- build_chain: before/after ---------------------------------------------------


def test_before_and_after_reorder() -> None:
    plugins: dict[str, dict[str, Any]] = {
        "request-id": {},
        "key-auth": {},
        "request-transformer": {},
    }
    assert _names(_chain(plugins)) == ["request-id", "key-auth", "request-transformer"]
    moved = {**plugins, "request-transformer": {"before": ["key-auth"]}}
    assert _names(_chain(moved)) == ["request-id", "request-transformer", "key-auth"]
    moved = {**plugins, "request-id": {"after": ["request-transformer"]}}
    assert _names(_chain(moved)) == ["key-auth", "request-transformer", "request-id"]
    # From the global table too, and `before`/`after` are not settings.
    chain = _chain(plugins, {"request-transformer": {"before": ["key-auth"], "path": "/x"}})
    assert _names(chain) == ["request-id", "key-auth", "request-transformer"]  # route wins
    chain = _chain({}, {"request-transformer": {"before": ["request-id"], "path": "/x"}})
    assert chain.plugins[0].config.path == "/x"


def test_a_constraint_moves_its_subject() -> None:
    # Priority order: request-id, key-auth (1250), gate (10), wrap (5), low (1).
    # `low before key-auth` lifts low to key-auth's place (it does not push
    # key-auth down past gate and wrap); `x after y` drops x to y's place.
    # Unconstrained plugins keep their relative order.
    registry: dict[str, type[Plugin[Any]]] = {"gate": Gate, "wrap": Wrap, "low": Low, **BUILTINS}
    route: dict[str, dict[str, Any]] = {"request-id": {}, "key-auth": {}, "gate": {}, "wrap": {}}
    chain = _chain({**route, "low": {"before": ["key-auth"]}}, registry=registry)
    assert _names(chain) == ["request-id", "low", "key-auth", "gate", "wrap"]
    # `key-auth after low` moves key-auth down to low's place instead.
    chain = _chain({**route, "low": {}, "key-auth": {"after": ["low"]}}, registry=registry)
    assert _names(chain) == ["request-id", "gate", "wrap", "low", "key-auth"]
    # A higher-priority plugin placed after a lower one lands right after it.
    chain = _chain({**route, "low": {}, "request-id": {"after": ["gate"]}}, registry=registry)
    assert _names(chain) == ["key-auth", "gate", "request-id", "wrap", "low"]
    # Chains of constraints compose: wrap before low, low before key-auth.
    chain = _chain(
        {**route, "wrap": {"before": ["low"]}, "low": {"before": ["key-auth"]}},
        registry=registry,
    )
    assert _names(chain) == ["request-id", "wrap", "low", "key-auth", "gate"]


def test_constraints_on_plugins_not_on_the_route_are_ignored() -> None:
    chain = _chain({"key-auth": {"before": ["cors"], "after": ["request-id"]}})
    assert _names(chain) == ["key-auth"]


def test_bad_before_after_values() -> None:
    assert _errors({"key-auth": {"before": ["ghost"]}}) == [
        "routes[0].plugins.key-auth: before/after names unknown plugin 'ghost'"
    ]
    assert _errors({"key-auth": {"after": "cors"}}) == [
        "routes[0].plugins.key-auth.after: expected a list of plugin names"
    ]


def test_a_cycle_is_a_load_error() -> None:
    assert _errors({"key-auth": {"before": ["cors"]}, "cors": {"before": ["key-auth"]}}) == [
        "routes[0]: before/after constraints form a cycle among cors, key-auth"
    ]
    three = {
        "request-id": {"after": ["key-auth"]},
        "key-auth": {"after": ["cors"]},
        "cors": {"after": ["request-id"]},
    }
    assert _errors(three) == [
        "routes[0]: before/after constraints form a cycle among cors, key-auth, request-id"
    ]


# ---- the Chain ---------------------------------------------------------------------


def test_describe() -> None:
    chain = _chain({"key-auth": {}, "cors": {}}, {"request-id": {}})
    described = chain.describe()
    assert described == (
        PluginSummary("request-id", 100000, ("response",)),
        PluginSummary("cors", 2000, ("access", "response")),
        PluginSummary("key-auth", 1250, ("access", "log")),
    )
    # What GET /routes shows of them (the admin API encodes the records as they are).
    assert msgspec.json.decode(msgspec.json.encode(described)) == [
        {"name": "request-id", "priority": 100000, "phases": ["response"]},
        {"name": "cors", "priority": 2000, "phases": ["access", "response"]},
        {"name": "key-auth", "priority": 1250, "phases": ["access", "log"]},
    ]
    with pytest.raises(AttributeError):
        described[0].priority = 0  # type: ignore[misc]  # frozen records
    empty = _chain({})
    assert empty.describe() == ()
    assert repr(empty) == "<Chain (empty)>"


def test_only_overridden_phases_are_in_the_chain() -> None:
    registry: dict[str, type[Plugin[Any]]] = {"gate": Gate, "wrap": Wrap, **BUILTINS}
    chain = _chain({"request-id": {}, "cors": {}, "gate": {}, "wrap": {}}, registry=registry)
    request_id, cors, gate, wrap = chain.plugins
    # The built-ins' synchronous forms where they have them (no coroutine
    # per request), the async methods elsewhere.
    assert chain.access == (cors.access_nowait, gate.access)
    assert chain.upstream == (wrap.upstream,)
    assert chain.response == (request_id.response_nowait, cors.response_nowait)
    assert chain.log == (wrap.log,)
    assert [m.__self__ for m in chain.access] == [cors, gate]  # bound to the instances


def test_buffers_response_only_when_a_plugin_asks() -> None:
    assert _chain({"response-transformer": {"add_headers": {"X-A": "1"}}}).buffering == ()
    chain = _chain({"response-transformer": {"add_json": {"a": 1}, "max_body_bytes": 1000}})
    assert chain.buffering == (chain.plugins[0],)
    assert chain.plugins[0].max_buffer_bytes == 1000
