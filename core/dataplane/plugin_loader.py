"""Finding plugins (entry points) and building each route's chain, once per
config load.

Theory of operation
-------------------
``discover()`` loads every entry point of the ``triogate.plugins`` group and
checks that each is a proper ``Plugin`` (a name equal to its entry-point name,
an int priority, a ``Config`` Struct that forbids unknown fields). A plugin
that fails to import or to pass these checks stops start-up with a message
naming it.

``build_chain()`` merges the global plugin table with the route's (the route
wins for a plugin in both), validates each plugin's settings against its
``Config`` (every error, with its config path), instantiates the plugins, and
orders them: priority first (highest first), then the ``before``/``after``
constraints, applied as a stable topological sort. A cycle is a load error.
The result is a ``Chain`` of bound phase methods, so the per-request work is
iterating tuples, never looking anything up.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

import msgspec

# PluginLoadError stays importable from here for plugin authors' tests
# (examples/plugins); it lives in triogate.errors.
from triogate.errors import FieldError, PluginLoadError, ValidationError
from triogate.plugins.contract import Plugin, PluginEnv
from triogate.validation import convert_all

__all__ = [
    "ENTRY_POINT_GROUP",
    "Chain",
    "PluginLoadError",
    "PluginSummary",
    "RouteSummary",
    "build_chain",
    "discover",
]

ENTRY_POINT_GROUP = "triogate.plugins"
_ORDER_KEYS = ("before", "after")


class PluginSummary(msgspec.Struct, frozen=True):
    """One plugin of a chain as ``GET /routes`` lists it."""

    name: str
    priority: int
    phases: tuple[str, ...]  # the phases it overrides (only those run)


class RouteSummary(msgspec.Struct, frozen=True):
    """One configured route as ``GET /routes`` lists it (the admin API encodes
    these records as they are)."""

    name: str
    methods: tuple[str, ...]  # ("*",) for any method
    path: str
    version: str | None
    upstream: str
    upstream_path: str | None
    plugins: tuple[PluginSummary, ...]  # the effective chain, in run order


class Chain:
    """One route's plugins in run order, and their phase methods."""

    __slots__ = ("access", "buffering", "log", "plugins", "response", "upstream")

    def __init__(self, plugins: Sequence[Plugin[Any]]) -> None:
        self.plugins = tuple(plugins)
        # Each phase's synchronous form when the plugin has one (no coroutine
        # per request); it may still hand back an awaitable (``Pipeline``).
        self.access = tuple(p.phase("access") for p in plugins if "access" in p.phases())
        # Outermost first; the wrappers of each single try (wraps_each_try)
        # innermost, inside retry (a stable sort keeps priority order).
        wrappers = sorted(
            (p for p in plugins if "upstream" in p.phases()), key=lambda p: p.wraps_each_try
        )
        self.upstream = tuple(p.upstream for p in wrappers)
        self.response = tuple(p.phase("response") for p in plugins if "response" in p.phases())
        self.log = tuple(p.phase("log") for p in plugins if "log" in p.phases())
        self.buffering = tuple(p for p in plugins if p.buffers_response)

    def __repr__(self) -> str:
        return f"<Chain {' > '.join(p.name for p in self.plugins) or '(empty)'}>"

    def describe(self) -> tuple[PluginSummary, ...]:
        return tuple(PluginSummary(p.name, p.priority, p.phases()) for p in self.plugins)


def _check_plugin(ep_name: str, obj: object) -> list[str]:
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        return ["is not a subclass of triogate.plugins.Plugin"]
    problems = []
    if getattr(obj, "name", None) != ep_name:
        problems.append(f"declares name {getattr(obj, 'name', None)!r}, expected {ep_name!r}")
    if not isinstance(getattr(obj, "priority", None), int):
        problems.append("has no int priority")
    config = getattr(obj, "Config", None)
    if not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
        problems.append("Config is not a msgspec.Struct")
    elif not config.__struct_config__.forbid_unknown_fields:
        problems.append("Config must forbid unknown fields (forbid_unknown_fields=True)")
    if not obj.phases() and not obj.binds():
        problems.append("overrides no phase (access, upstream, response, log) nor bind")
    return problems


def discover() -> dict[str, type[Plugin[Any]]]:
    """Every plugin registered in the ``triogate.plugins`` entry-point group."""
    found: dict[str, type[Plugin[Any]]] = {}
    errors: list[FieldError] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            errors.append(FieldError(f"plugin {ep.name}", f"registered twice ({ep.value})"))
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # anything a broken package raises on import
            errors.append(FieldError(f"plugin {ep.name}", f"failed to load {ep.value}: {exc!r}"))
            continue
        problems = _check_plugin(ep.name, obj)
        if problems:
            errors.extend(FieldError(f"plugin {ep.name}", p) for p in problems)
            continue
        found[ep.name] = obj
    if errors:
        raise PluginLoadError(errors)
    return found


def _order(
    plugins: list[Plugin[Any]], constraints: Mapping[str, tuple[list[str], list[str]]], path: str
) -> list[Plugin[Any]]:
    """Priority order, adjusted by before/after.

    A constraint moves its *subject*: ``a before b`` lifts ``a`` to ``b``'s
    place (not ``b`` down to ``a``'s), ``a after b`` drops ``a`` to ``b``'s
    place. Each plugin gets an effective rank (propagated to a fixed point,
    so chains of constraints compose), and Kahn's algorithm emits plugins in
    (effective rank, priority rank) order while honouring every edge, so
    unconstrained plugins keep their priority order."""
    by_name = {p.name: p for p in plugins}
    rank = {p.name: i for i, p in enumerate(plugins)}  # already priority-sorted
    edges: dict[str, set[str]] = {name: set() for name in by_name}  # a -> b: a runs before b
    moves: list[tuple[str, str, bool]] = []  # (subject, anchor, moves up)
    for name, (before, after) in constraints.items():
        for other in before:
            if other in by_name:
                edges[name].add(other)
                moves.append((name, other, True))
        for other in after:
            if other in by_name:
                edges[other].add(name)
                moves.append((name, other, False))
    effective = dict(rank)
    for _ in range(len(plugins) + 1):
        changed = False
        for subject, anchor, up in moves:
            target = effective[anchor]
            if (up and target < effective[subject]) or (not up and target > effective[subject]):
                effective[subject] = target
                changed = True
        if not changed:
            break
    indegree = dict.fromkeys(by_name, 0)
    for targets in edges.values():
        for t in targets:
            indegree[t] += 1
    ready = [(effective[n], rank[n], n) for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    out: list[Plugin[Any]] = []
    while ready:
        _, _, name = heapq.heappop(ready)
        out.append(by_name[name])
        for t in edges[name]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(ready, (effective[t], rank[t], t))
    if len(out) != len(plugins):
        stuck = sorted(n for n, d in indegree.items() if d > 0)
        raise PluginLoadError(
            [FieldError(path, f"before/after constraints form a cycle among {', '.join(stuck)}")]
        )
    return out


def _names(raw: Any, path: str, errors: list[FieldError]) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return raw
    errors.append(FieldError(path, "expected a list of plugin names"))
    return []


def build_chain(
    registry: Mapping[str, type[Plugin[Any]]],
    global_plugins: Mapping[str, Mapping[str, Any]],
    route_plugins: Mapping[str, Mapping[str, Any]],
    env: PluginEnv,
    *,
    route_path: str,
) -> Chain:
    """Validate, instantiate and order the plugins of one route."""
    merged: dict[str, tuple[str, Mapping[str, Any]]] = {
        name: (f"plugins.{name}", cfg) for name, cfg in global_plugins.items()
    }
    for name, cfg in route_plugins.items():
        merged[name] = (f"{route_path}.plugins.{name}", cfg)
    errors: list[FieldError] = []
    instances: list[Plugin[Any]] = []
    constraints: dict[str, tuple[list[str], list[str]]] = {}
    for name, (path, raw) in merged.items():
        cls = registry.get(name)
        if cls is None:
            known = ", ".join(sorted(registry)) or "none"
            errors.append(FieldError(path, f"unknown plugin {name!r} (installed: {known})"))
            continue
        if not isinstance(raw, Mapping):
            errors.append(FieldError(path, "expected a table of settings"))
            continue
        settings = {k: v for k, v in raw.items() if k not in _ORDER_KEYS}
        before = _names(raw.get("before"), f"{path}.before", errors)
        after = _names(raw.get("after"), f"{path}.after", errors)
        for other in (*before, *after):
            if other not in registry:
                errors.append(FieldError(path, f"before/after names unknown plugin {other!r}"))
        constraints[name] = (before, after)
        try:
            config = convert_all(settings, cls.Config, path=path)
        except ValidationError as exc:
            errors.extend(exc.errors)
            continue
        try:
            instances.append(cls(config, env))
        except (ValueError, TypeError) as exc:
            errors.append(FieldError(path, f"plugin {name!r} refused its settings: {exc}"))
    if errors:
        raise PluginLoadError(errors)
    instances.sort(key=lambda p: -p.priority)
    return Chain(_order(instances, constraints, route_path))
