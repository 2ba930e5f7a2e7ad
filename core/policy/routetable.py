"""The compiled routing trie: ``Route`` (one configured route), ``Match``
(what a lookup found), and the nodes and leaves ``Router`` walks. Built by
``Router.compile``; the theory of operation is in ``router``'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

import msgspec

from triogate.config import RouteConfig
from triogate.policy.routetemplate import (
    MIXED,
    PARAM,
    PATH,
    STATIC,
    Headers,
    Param,
    Segment,
    version_key,
)
from triogate.policy.userregex import Pattern

__all__ = [
    "METHODS",
    "Leaf",
    "Match",
    "Node",
    "Route",
    "RouterStatistics",
    "Table",
    "first_invalid",
]

# The methods a route may declare (config.HttpMethod). A request with any other
# method can only reach a route that declares none (= every method).
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


# --- compiled structures -----------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Route:
    """One configured route, compiled."""

    name: str
    index: int  # position in the config's routes list
    config: RouteConfig
    methods: frozenset[str] | None  # as declared; None: every method
    version: str | None  # RouteConfig.version (None when the path has {version})
    param_names: tuple[str, ...]  # in template order, as captured
    deprecation_headers: Headers  # for ``version``; path versions look theirs up
    _segments: tuple[Segment, ...]
    _version_param: int | None  # index of {version} in param_names
    _version_is_int: bool
    _rewrite: str | None  # format_map template, None: forward the path unchanged

    def allows(self, method: str) -> bool:
        if self.methods is None:
            return True
        return method in self.methods or (method == "HEAD" and "GET" in self.methods)

    def __repr__(self) -> str:
        return f"<Route {self.index} {self.name!r} {self.config.path}>"


class Match(msgspec.Struct, frozen=True):
    """What ``Router.match`` found for one request."""

    route: Route
    params: dict[str, str]  # raw (still percent-encoded) segment text
    version: str | None  # from {version} in the path, else the route's version
    deprecation_headers: Headers  # shared, precomputed: never mutated
    path: str  # the request path as received


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    routes: int
    nodes: int
    max_depth: int
    lookups: int  # match() calls so far
    nodes_visited: int  # trie nodes the fast walk has entered, in total


class Table:
    """The routes of one leaf that allow one method, by version."""

    __slots__ = ("default", "versions")

    def __init__(self, routes: list[Route]) -> None:
        self.versions: dict[str, Route] = {}
        for route in routes:
            if route.version is not None:
                self.versions.setdefault(route.version, route)
        unversioned = [r for r in routes if r.version is None]
        # Without Accept-Version: the unversioned route, else the newest version.
        self.default: Route = (
            unversioned[0] if unversioned else self.versions[max(self.versions, key=version_key)]
        )

    def select(self, accept: str) -> Route | None:
        # A leaf without versioned routes ignores the header: a client that
        # sends Accept-Version everywhere must still reach unversioned routes.
        return self.versions.get(accept) if self.versions else self.default


class Leaf:
    __slots__ = ("allow", "defaults", "other", "routes", "tables")

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self.tables: dict[str, Table] = {}
        for method in METHODS:
            candidates = [r for r in routes if r.methods is None or method in r.methods]
            if method == "HEAD":  # GET routes answer HEAD unless one claims it
                claimed = {r.version for r in candidates}
                candidates += [
                    r
                    for r in routes
                    if r.methods is not None and "GET" in r.methods and r.version not in claimed
                ]
            if candidates:
                self.tables[method] = Table(candidates)
        every = [r for r in routes if r.methods is None]
        self.other: Table | None = Table(every) if every else None
        self.defaults: dict[str, Route] = {m: t.default for m, t in self.tables.items()}
        self.allow: frozenset[str] | None = None if every else frozenset(self.tables)

    def resolve(self, method: str, accept: str | None) -> Route | None:
        if accept is None:
            route = self.defaults.get(method)
            return route if route is not None or self.other is None else self.other.default
        table = self.tables.get(method, self.other)
        return None if table is None else table.select(accept)


class Node:
    __slots__ = ("catchall", "keyed", "leaf", "mixed", "params", "routes", "static", "static_only")

    def __init__(self) -> None:
        self.static: dict[str, Node] = {}
        # (typed regex, param group numbers or None, child, shape regex)
        self.mixed: tuple[tuple[Pattern, tuple[int, ...] | None, Node, Pattern], ...] = ()
        self.params: tuple[tuple[Callable[[str], object] | None, Node], ...] = ()
        self.catchall: Node | None = None
        self.leaf: Leaf | None = None
        self.static_only = True
        # Build time only: non-static children by shape key, and routes ending here.
        self.keyed: dict[Hashable, tuple[Segment, Node]] = {}
        self.routes: list[Route] = []

    def child(self, segment: Segment) -> Node:
        if segment.kind == STATIC:
            return self.static.setdefault(segment.text, Node())
        if segment.key not in self.keyed:
            self.keyed[segment.key] = (segment, Node())
        return self.keyed[segment.key][1]

    def freeze(self) -> None:
        """Order the non-static children by precedence for the walk."""
        mixed = sorted(
            (s for s, _ in self.keyed.values() if s.kind == MIXED), key=lambda s: -s.literal_len
        )
        self.mixed = tuple(
            (s.pattern, s.groups, self.keyed[s.key][1], s.shape)
            for s in mixed
            if s.pattern is not None and s.shape is not None
        )
        params = sorted(
            (s for s, _ in self.keyed.values() if s.kind == PARAM),
            key=lambda s: s.params[0].type.rank,
        )
        self.params = tuple((s.params[0].type.check, self.keyed[s.key][1]) for s in params)
        paths = [n for s, n in self.keyed.values() if s.kind == PATH]
        self.catchall = paths[0] if paths else None
        self.static_only = not (self.mixed or self.params or self.catchall)
        if self.routes:
            self.leaf = Leaf(self.routes)

    def children(self) -> list[Node]:
        return [*self.static.values(), *(n for _, n in self.keyed.values())]


def first_invalid(route: Route, segments: list[str]) -> Param | None:
    """The first param of ``route`` (whose shape ``segments`` has) that fails its type."""
    for spec, text in zip(route._segments, segments, strict=False):
        if spec.kind == PARAM:
            param = spec.params[0]
            if param.type.check is not None and not param.type.check(text):
                return param
        elif spec.kind == MIXED and spec.shape is not None:
            found = spec.shape.fullmatch(text)
            values = found.groups() if found is not None else ()
            for param, value in zip(spec.params, values, strict=False):
                if param.type.check is not None and not param.type.check(value):
                    return param
    return None
