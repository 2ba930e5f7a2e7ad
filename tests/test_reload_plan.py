"""Decide, then act: building a config touches nothing live.

A reload builds the new router, plugin chains and ``bind`` results into a
plan; only a plan for a config that validated completely is applied, in one
step. So a reload refused by a plugin that binds late (after the
circuit-breaker plugin has said what it wants) leaves every live breaker
(settings and state), pool and health state exactly as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tests.conftest import make_secrets
from tests.test_reload import write_doc
from triogate.config import Config, parse_config
from triogate.control.audit import Actor
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_loader import discover
from triogate.dataplane.upstream import TargetPool
from triogate.errors import ConfigError
from triogate.plugins.contract import NoConfig, Plugin, PluginEnv
from triogate.policy.breaker import State
from triogate.runtime.gateway import Gateway
from triogate.runtime.reload import RELOAD_TABLE, Applies, changed_settings, restart_errors
from triogate.storage import MemoryStore

TARGET = "http://127.0.0.1:9"  # never contacted: the tests drive the breakers by hand


class RefusesToBind(Plugin[NoConfig]):
    """Binds after the circuit-breaker (lower priority) and refuses."""

    name = "refuses-to-bind"
    priority = 400

    def bind(self, route: Any, upstream: Any) -> None:
        raise ValueError("this route cannot have it")


REGISTRY = {**discover(), RefusesToBind.name: RefusesToBind}


def config_raw(data_dir: Path, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "server": {
            "proxy_listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
        },
        "log": {"access_log": ""},
        "upstreams": {"a": {"targets": [TARGET]}, "b": {"targets": [TARGET]}},
        "routes": routes,
    }


def breaker(**settings: Any) -> dict[str, Any]:
    return {"circuit-breaker": settings}


def first(data_dir: Path) -> Config:
    return parse_config(
        config_raw(
            data_dir,
            [
                {
                    "name": "a",
                    "path": "/a",
                    "upstream": "a",
                    "plugins": breaker(failure_threshold=2),
                },
                {
                    "name": "b",
                    "path": "/b",
                    "upstream": "b",
                    "plugins": breaker(failure_threshold=3),
                },
            ],
        ),
        environ={},
    )


# Each refused config changes both breakers' settings (or drops one), then
# fails in a plugin's bind: on a later route, or later on the same route.
REFUSED: dict[str, list[dict[str, Any]]] = {
    "a later route": [
        {"name": "a", "path": "/a", "upstream": "a", "plugins": breaker(failure_threshold=7)},
        {"name": "b", "path": "/b", "upstream": "b"},  # b's breaker would go
        {"name": "c", "path": "/c", "upstream": "a", "plugins": {"refuses-to-bind": {}}},
    ],
    "the same route": [
        {
            "name": "a",
            "path": "/a",
            "upstream": "a",
            "plugins": {**breaker(failure_threshold=7), "refuses-to-bind": {}},
        },
        {"name": "b", "path": "/b", "upstream": "b", "plugins": breaker(open_seconds=99)},
    ],
}


def pools(pipeline: Pipeline) -> dict[str, TargetPool]:
    return {name: u.pools[0] for name, u in pipeline.upstreams.items()}


def live_state(pipeline: Pipeline) -> dict[str, Any]:
    """Everything a refused reload must leave alone, by value."""
    out: dict[str, Any] = {}
    for name, pool in pools(pipeline).items():
        b = pool.breaker
        assert b is not None
        out[name] = (
            id(b),
            b.settings,
            b.snapshot(105.0),  # inside the open period: reading changes nothing
            pool.failure_policy,
            pool.healthy,
            pool.closed,
        )
    return out


def open_breaker_a_and_mark_b_unhealthy(pipeline: Pipeline) -> None:
    p = pools(pipeline)
    ba = p["a"].breaker
    assert ba is not None
    ba.record(True, 100.0)
    ba.record(True, 101.0)
    assert ba.state is State.OPEN and ba.opened == 1
    bb = p["b"].breaker
    assert bb is not None
    bb.record(True, 100.0)  # one failure counted, still closed
    p["b"].healthy = False  # as the health checker would


@pytest.mark.parametrize("where", sorted(REFUSED))
def test_a_refused_build_leaves_live_breakers_pools_and_health_alone(
    tmp_path: Path, where: str
) -> None:
    live = Pipeline.build(first(tmp_path), REGISTRY, PluginEnv())
    open_breaker_a_and_mark_b_unhealthy(live)
    before = live_state(live)
    policies = {name: id(pool.failure_policy) for name, pool in pools(live).items()}
    refused = parse_config(config_raw(tmp_path, REFUSED[where]), environ={})

    with pytest.raises(ConfigError) as info:
        Pipeline.build(refused, REGISTRY, PluginEnv(), previous=live)

    assert any("refuses-to-bind" in e.path for e in info.value.errors), info.value.errors
    assert live_state(live) == before
    assert {name: id(pool.failure_policy) for name, pool in pools(live).items()} == policies
    a = pools(live)["a"].breaker
    assert a is not None
    assert a.settings.failure_threshold == 2 and a.state is State.OPEN and a.opened == 1


def test_a_plan_changes_nothing_until_applied(tmp_path: Path) -> None:
    live = Pipeline.build(first(tmp_path), REGISTRY, PluginEnv())
    open_breaker_a_and_mark_b_unhealthy(live)
    before = live_state(live)
    # a's breaker gets new settings, b's goes (no route configures one).
    changed = parse_config(
        config_raw(
            tmp_path,
            [
                {
                    "name": "a",
                    "path": "/a",
                    "upstream": "a",
                    "plugins": breaker(failure_threshold=7),
                },
                {"name": "b", "path": "/b", "upstream": "b"},
            ],
        ),
        environ={},
    )

    plan = Pipeline.plan(changed, REGISTRY, PluginEnv(), previous=live)
    assert live_state(live) == before
    assert set(plan.upstreams.keep) == {"a", "b"} and not plan.upstreams.create
    assert plan.upstreams.breakers["a"] is not None
    assert plan.upstreams.breakers["a"].settings.failure_threshold == 7
    assert plan.upstreams.breakers["b"] is None

    new = Pipeline(plan)
    assert new.upstreams["a"] is live.upstreams["a"]  # kept: same pools
    a, b = pools(new)["a"], pools(new)["b"]
    assert a.breaker is not None and a.breaker.settings.failure_threshold == 7
    assert a.breaker.state is State.CLOSED  # new settings: a new breaker
    assert b.breaker is None
    assert b.healthy is False  # health state is the pool's: carried over


def test_unchanged_breaker_settings_keep_the_breaker_and_its_state(tmp_path: Path) -> None:
    live = Pipeline.build(first(tmp_path), REGISTRY, PluginEnv())
    open_breaker_a_and_mark_b_unhealthy(live)
    before = live_state(live)
    again = Pipeline.build(first(tmp_path), REGISTRY, PluginEnv(), previous=live)
    assert live_state(again) == before


def test_a_changed_upstream_is_created_and_the_old_one_retired(tmp_path: Path) -> None:
    live = Pipeline.build(first(tmp_path), REGISTRY, PluginEnv())
    raw = config_raw(tmp_path, [{"name": "a", "path": "/a", "upstream": "a"}])
    raw["upstreams"] = {"a": {"targets": [TARGET], "read_timeout_seconds": 7}}
    plan = Pipeline.plan(parse_config(raw, environ={}), REGISTRY, PluginEnv(), previous=live)
    assert set(plan.upstreams.create) == {"a"} and not plan.upstreams.keep
    assert {u.name for u in plan.upstreams.retire} == {"a", "b"}
    assert all(u is not live.upstreams[u.name] for u in plan.upstreams.create.values())


# ---- the same through the gateway's reload ------------------------------------------


def write_config(path: Path, routes: list[dict[str, Any]], data_dir: Path) -> None:
    write_doc(path, config_raw(data_dir, routes))


async def test_a_reload_refused_by_a_late_bind_changes_nothing_live(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    data = tmp_path / "data"
    first_routes = [
        {"name": "a", "path": "/a", "upstream": "a", "plugins": breaker(failure_threshold=2)},
        {"name": "b", "path": "/b", "upstream": "b", "plugins": breaker(failure_threshold=3)},
    ]
    write_config(cfg, first_routes, data)
    config = parse_config(config_raw(data, first_routes), environ={})
    gw = Gateway(
        config, MemoryStore(), make_secrets(), source=str(cfg), extra_plugins=(RefusesToBind,)
    )
    live = gw.pipeline
    open_breaker_a_and_mark_b_unhealthy(live)
    before = live_state(live)
    active = gw.active

    write_config(cfg, REFUSED["a later route"], data)
    with pytest.raises(ConfigError):
        await gw.configs.reload(Actor("test"))

    assert gw.pipeline is live and gw.active is active and gw.configs.reloads == 0
    assert live_state(live) == before
    await trio.lowlevel.checkpoint()


# ---- what a reload may change: one table ----------------------------------------------


def _setting_paths() -> set[str]:
    """Every setting of ``Config``: a section's fields, or a whole collection."""
    paths = set()
    for field in msgspec.structs.fields(Config):
        default = field.default
        if isinstance(default, msgspec.Struct):
            paths |= {f"{field.name}.{f.name}" for f in msgspec.structs.fields(type(default))}
        else:
            paths.add(field.name)
    return paths


def test_the_reload_table_decides_every_setting() -> None:
    assert set(RELOAD_TABLE) == _setting_paths()


def test_a_restart_only_change_is_listed_and_others_say_who_applies_them(tmp_path: Path) -> None:
    old = first(tmp_path)
    new = msgspec.structs.replace(
        old,
        server=msgspec.structs.replace(old.server, workers=2, idle_timeout_seconds=5),
        log=msgspec.structs.replace(old.log, level="DEBUG"),
    )
    assert [e.path for e in restart_errors(old, new)] == ["server.workers"]
    assert changed_settings(old, new) == {Applies.RESTART, Applies.LISTENER, Applies.LOGGING}
    assert changed_settings(old, old) == frozenset()


class BreaksInBind(Plugin[NoConfig]):
    """A plugin with a bug in ``bind`` (not a ValueError)."""

    name = "breaks-in-bind"
    priority = 400

    def bind(self, route: Any, upstream: Any) -> None:
        route.methods.append("POST")  # RouteView.methods is a tuple or None


def test_a_plugin_bug_in_bind_is_a_load_error_naming_it(tmp_path: Path) -> None:
    registry = {**REGISTRY, BreaksInBind.name: BreaksInBind}
    raw = config_raw(
        tmp_path,
        [{"name": "a", "path": "/a", "upstream": "a", "plugins": {"breaks-in-bind": {}}}],
    )
    with pytest.raises(ConfigError) as info:
        Pipeline.plan(parse_config(raw, environ={}), registry, PluginEnv())
    (error,) = info.value.errors
    assert error.path == "routes[0].plugins.breaks-in-bind"
    assert error.message.startswith("bind failed: AttributeError")
