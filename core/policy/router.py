"""Request routing: (method, raw path, Accept-Version) -> route, params, version.

Theory of operation
-------------------
``Router.compile`` turns the ``[[routes]]`` table into a trie once per config;
``Router.match`` walks it on every proxied request. A trie level is one path
segment (the text between two ``/``), and every node has, in precedence order:

1. ``static``: a dict from exact segment text to child. Most routes are mostly
   static, so lookup is one dict probe per segment and the cost does not grow
   with the number of routes.
2. ``mixed``: segments with literal text around params (``v{version:int}``,
   ``{name}.json``), one compiled regex each; more literal text first.
3. ``params``: whole-segment params, ``int`` and ``uuid`` before ``str`` (the
   plain ones) before ``re:`` params (in config order).
4. ``catchall``: a ``{x:path}`` param, which eats the rest of the path.

Only non-static edges are scanned linearly, and there is one per distinct
*shape* at that level (``{id:int}`` and ``{uid:int}`` share a node), not one
per route. The walk is depth-first: if the most specific child fails further
down (no leaf, or no route there for this method / version), it backtracks
and tries the next candidate, so ``/users/me`` beats ``/users/{id}`` and
``/files/{p:path}`` only gets what nothing more specific takes (including a
method the more specific route does not allow). Since a ``str`` param takes
any segment, an ``re:`` param next to one at the same place is only reached
when the ``str`` branch fails deeper down. A path that is wholly static in
some route skips the walk: one dict probe on the whole path finds the leaf the
walk would reach first.

A leaf holds the routes that share one shape, with their methods and versions
resolved into tables at compile time: ``{method: route}`` for requests without
Accept-Version, ``{method: {version: route}}`` for requests with it. A route
allowing GET also answers HEAD unless another route claims HEAD explicitly.
Two routes in one leaf with overlapping methods and the same version can never
be told apart: that is a compile error, like every bad template.

Versions: a ``{version}`` path param (``v01`` read as ``1`` when typed
``int``) is the version, and Accept-Version is ignored for such routes. Else,
among a leaf's routes for the method, Accept-Version picks the route with that
``version`` (404 listing the versions if none has it); without the header the
unversioned route wins, else the highest version. A leaf with no versioned
routes ignores the header, so clients may send it everywhere. Deprecation and
Sunset headers per version are built at compile time.

Params are captured positionally during the walk (routes sharing a node may
name the same param differently) and zipped with the chosen route's names at
the end: the success path allocates the segment list, the values list, the
params dict and the ``Match``.

Errors are worked out only after the fast walk fails, by walking again:

- every leaf the path reaches with typed params checked: if there is one,
  the path is fine and the method (405, with ``Allow``) or the Accept-Version
  (404 naming the versions that exist) is what is wrong;
- else the first leaf reached when every param accepts any non-empty
  segment: the path has a route's *shape* (its static parts line up) and a
  typed param is what failed, so the client gets 400 naming the parameter
  rather than a 404 that would hide the typo from them;
- else 404.

Paths are matched raw, as received (percent-encoding intact); ``//`` makes an
empty segment that only a static empty segment (a template's trailing ``/``)
can take, so ``/users/`` and ``/users`` are different paths.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import format_datetime
from typing import Final, NoReturn

import msgspec

from triogate.config import ApiVersionConfig, ConfigError, RouteConfig
from triogate.errors import FieldError, InvalidPathParameter, MethodNotAllowed, RouteNotFound
from triogate.policy.userregex import Pattern, RegexError, compile_linear

__all__ = ["Match", "Route", "Router", "RouterStatistics"]

# The methods a route may declare (config.HttpMethod). A request with any other
# method can only reach a route that declares none (= every method).
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MAX_SEGMENTS: Final = 128  # keeps the recursive walk far from Python's recursion limit

Headers = tuple[tuple[str, str], ...]
_NO_HEADERS: Final[Headers] = ()


# --- parameter types -------------------------------------------------------


def _is_int(text: str) -> bool:
    digits = text[1:] if text[:1] == "-" else text
    # isdigit() alone accepts '²' and other non-ASCII digits.
    return digits.isascii() and digits.isdigit()


_UUID: Final = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


@dataclass(frozen=True, slots=True)
class _ParamType:
    key: str  # part of the shape: "int", "uuid", "str", "path" or "re:<regex>"
    pattern: str  # regex for this param inside a mixed segment
    check: Callable[[str], object] | None  # None: any non-empty segment
    rank: int  # precedence among whole-segment params at one node
    expected: str  # completes "path parameter 'id' must ..."
    inner_groups: int = 0  # capturing groups inside a user regex


_TYPES: Final[dict[str, _ParamType]] = {
    "int": _ParamType("int", r"-?[0-9]+", _is_int, 0, "be an int"),
    "uuid": _ParamType("uuid", _UUID, re.compile(_UUID).fullmatch, 1, "be a UUID"),
    "str": _ParamType("str", r"[^/]+?", None, 2, "be a non-empty segment"),
    "path": _ParamType("path", "", None, 4, "be a non-empty path"),
}
_REGEX_RANK: Final = 3
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _regex_type(source: str) -> _ParamType:
    # RE2, not re: linear time whatever the pattern (see userregex.py).
    compiled = compile_linear(source)  # RegexError is reported by the caller
    return _ParamType(
        "re:" + source,
        f"(?:{source})",
        compiled.fullmatch,
        _REGEX_RANK,
        f"match the pattern {source!r}",
        compiled.groups,
    )


# --- templates ---------------------------------------------------------------

_STATIC, _PARAM, _MIXED, _PATH = range(4)


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    type: _ParamType


@dataclass(frozen=True, slots=True)
class _Segment:
    kind: int
    text: str
    params: tuple[_Param, ...] = ()
    key: Hashable = None  # equal keys <=> same shape at this level
    pattern: Pattern | None = None  # mixed: params typed
    shape: re.Pattern[str] | None = None  # mixed: every param is "any text"
    groups: tuple[int, ...] | None = None  # mixed: param group numbers, if not 1..n
    literal_len: int = 0


def _split_template(template: str, errors: list[str]) -> list[list[str | tuple[str, int]]]:
    """Split on '/' outside braces; each segment is a list of literal text and
    (param spec, position) items. Braces nest (``{s:re:[a-z]{2}}``) and a
    backslash escapes the next character inside them."""
    segments: list[list[str | tuple[str, int]]] = []
    parts: list[str | tuple[str, int]] = []
    literal: list[str] = []
    i, n = 1, len(template)  # template[0] == "/" (RouteConfig's pattern)
    while i < n:
        c = template[i]
        if c == "/":
            if literal:
                parts.append("".join(literal))
                literal.clear()
            segments.append(parts)
            parts = []
        elif c == "{":
            depth, j = 1, i + 1
            while j < n:
                if template[j] == "\\":
                    j += 2
                    continue
                if template[j] == "{":
                    depth += 1
                elif template[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= n:
                errors.append(f"unbalanced '{{' at position {i}")
                return []
            if literal:
                parts.append("".join(literal))
                literal.clear()
            parts.append((template[i + 1 : j], i))
            i = j
        elif c == "}":
            errors.append(f"unbalanced '}}' at position {i}")
            return []
        else:
            literal.append(c)
        i += 1
    if literal:
        parts.append("".join(literal))
    segments.append(parts)
    return segments


def _parse_param(spec: str, errors: list[str]) -> _Param | None:
    name, _, type_spec = spec.partition(":")
    if not _NAME_RE.fullmatch(name):
        errors.append(f"invalid parameter name {name!r}")
        return None
    if not type_spec:
        return _Param(name, _TYPES["str"])
    if type_spec.startswith("re:"):
        source = type_spec[3:]
        if not source:
            errors.append(f"invalid regex for parameter {name!r}: empty")
            return None
        try:
            return _Param(name, _regex_type(source))
        except RegexError as exc:
            errors.append(f"invalid regex {source!r}: {exc} (RE2 syntax)")
            return None
    ptype = _TYPES.get(type_spec)
    if ptype is None:
        errors.append(f"unknown parameter type {type_spec!r}")
        return None
    return _Param(name, ptype)


def _mixed_segment(text: str, parts: list[str | _Param], errors: list[str]) -> _Segment | None:
    typed, shape, key, groups = [], [], [], []
    group = 1
    for part in parts:
        if isinstance(part, str):
            typed.append(re.escape(part))
            shape.append(re.escape(part))
            key.append(("", part))
        else:
            typed.append(f"({part.type.pattern})")
            shape.append("([^/]+?)")
            key.append(("{}", part.type.key))
            groups.append(group)
            group += 1 + part.type.inner_groups
    # A user regex inside makes the whole segment RE2's (linear time).
    user = any(isinstance(p, _Param) and p.type.key.startswith("re:") for p in parts)
    pattern: Pattern
    try:
        pattern = compile_linear("".join(typed)) if user else re.compile("".join(typed))
    except (re.error, RegexError) as exc:
        errors.append(f"invalid regex in segment {text!r}: {exc}")
        return None
    params = tuple(p for p in parts if isinstance(p, _Param))
    return _Segment(
        _MIXED,
        text,
        params,
        ("mixed", *key),
        pattern,
        re.compile("".join(shape)),
        None if pattern.groups == len(params) else tuple(groups),
        sum(len(p) for p in parts if isinstance(p, str)),
    )


def _parse_path(template: str) -> tuple[list[_Segment], list[str]]:
    """The segments of a route path, or the problems with it (without prefix)."""
    errors: list[str] = []
    raw_segments = _split_template(template, errors)
    if len(raw_segments) > MAX_SEGMENTS:
        errors.append(f"more than {MAX_SEGMENTS} segments")
    segments: list[_Segment] = []
    seen: set[str] = set()
    last = len(raw_segments) - 1
    for index, raw in enumerate(raw_segments):
        text = "".join(p if isinstance(p, str) else "{" + p[0] + "}" for p in raw)
        parts: list[str | _Param] = []
        for item in raw:
            if isinstance(item, str):
                parts.append(item)
                continue
            param = _parse_param(item[0], errors)
            if param is None:
                continue
            if param.name in seen:
                errors.append(f"duplicate parameter name {param.name!r}")
            seen.add(param.name)
            if param.type.key == "path":
                if index != last:
                    errors.append(f"a {{{param.name}:path}} parameter must be the last segment")
                elif len(raw) != 1:
                    errors.append(f"a {{{param.name}:path}} parameter must fill its segment")
            parts.append(param)
        if errors:
            continue  # keep collecting problems, but build nothing
        if not any(isinstance(p, _Param) for p in parts):
            segments.append(_Segment(_STATIC, text, key=("static", text)))
        elif len(parts) == 1 and isinstance(parts[0], _Param):
            param = parts[0]
            kind = _PATH if param.type.key == "path" else _PARAM
            segments.append(_Segment(kind, text, (param,), (param.type.key,)))
        else:
            segment = _mixed_segment(text, parts, errors)
            if segment is not None:
                segments.append(segment)
    return segments, errors


def _rewrite_template(template: str, names: Sequence[str] | None, errors: list[str]) -> str | None:
    """``/users/{id}`` -> a ``str.format_map`` string. Literal text is escaped,
    so only ``{param}`` fields are substituted."""
    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c == "{":
            j = template.find("}", i)
            if j < 0:
                errors.append(f"unbalanced '{{' at position {i}")
                return None
            name = template[i + 1 : j]
            if names is not None and name not in names:
                errors.append(f"unknown parameter {name!r}")
            out.append("{" + name + "}")
            i = j + 1
            continue
        if c == "}":
            errors.append(f"unbalanced '}}' at position {i}")
            return None
        out.append(c)
        i += 1
    return "".join(out)


# --- versions ----------------------------------------------------------------


def _compare_versions(a: str, b: str) -> int:
    if a.isascii() and a.isdigit() and b.isascii() and b.isdigit():
        x, y = int(a), int(b)
        return (x > y) - (x < y)
    return (a > b) - (a < b)


_version_key: Final = functools.cmp_to_key(_compare_versions)


def _canonical_int(text: str) -> str:
    """``v01`` and ``v1`` are the same version (string ops: int() of a huge
    path segment would raise past Python's digit limit)."""
    negative = text.startswith("-")
    digits = (text[1:] if negative else text).lstrip("0") or "0"
    return "-" + digits if negative and digits != "0" else digits


def _deprecation_headers(config: ApiVersionConfig) -> Headers:
    headers: list[tuple[str, str]] = []
    if config.deprecated:
        headers.append(("Deprecation", "true"))
    if config.sunset is not None:
        # RFC 9110 IMF-fixdate, e.g. "Wed, 30 Jun 2027 00:00:00 GMT".
        headers.append(("Sunset", format_datetime(config.sunset.astimezone(UTC), usegmt=True)))
    return tuple(headers)


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
    _segments: tuple[_Segment, ...]
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


class _Table:
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
            unversioned[0] if unversioned else self.versions[max(self.versions, key=_version_key)]
        )

    def select(self, accept: str) -> Route | None:
        # A leaf without versioned routes ignores the header: a client that
        # sends Accept-Version everywhere must still reach unversioned routes.
        return self.versions.get(accept) if self.versions else self.default


class _Leaf:
    __slots__ = ("allow", "defaults", "other", "routes", "tables")

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self.tables: dict[str, _Table] = {}
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
                self.tables[method] = _Table(candidates)
        every = [r for r in routes if r.methods is None]
        self.other: _Table | None = _Table(every) if every else None
        self.defaults: dict[str, Route] = {m: t.default for m, t in self.tables.items()}
        self.allow: frozenset[str] | None = None if every else frozenset(self.tables)

    def resolve(self, method: str, accept: str | None) -> Route | None:
        if accept is None:
            route = self.defaults.get(method)
            return route if route is not None or self.other is None else self.other.default
        table = self.tables.get(method, self.other)
        return None if table is None else table.select(accept)


class _Node:
    __slots__ = ("catchall", "keyed", "leaf", "mixed", "params", "routes", "static", "static_only")

    def __init__(self) -> None:
        self.static: dict[str, _Node] = {}
        # (typed regex, param group numbers or None, child, shape regex)
        self.mixed: tuple[tuple[Pattern, tuple[int, ...] | None, _Node, re.Pattern[str]], ...] = ()
        self.params: tuple[tuple[Callable[[str], object] | None, _Node], ...] = ()
        self.catchall: _Node | None = None
        self.leaf: _Leaf | None = None
        self.static_only = True
        # Build time only: non-static children by shape key, and routes ending here.
        self.keyed: dict[Hashable, tuple[_Segment, _Node]] = {}
        self.routes: list[Route] = []

    def child(self, segment: _Segment) -> _Node:
        if segment.kind == _STATIC:
            return self.static.setdefault(segment.text, _Node())
        if segment.key not in self.keyed:
            self.keyed[segment.key] = (segment, _Node())
        return self.keyed[segment.key][1]

    def freeze(self) -> None:
        """Order the non-static children by precedence for the walk."""
        mixed = sorted(
            (s for s, _ in self.keyed.values() if s.kind == _MIXED), key=lambda s: -s.literal_len
        )
        self.mixed = tuple(
            (s.pattern, s.groups, self.keyed[s.key][1], s.shape)
            for s in mixed
            if s.pattern is not None and s.shape is not None
        )
        params = sorted(
            (s for s, _ in self.keyed.values() if s.kind == _PARAM),
            key=lambda s: s.params[0].type.rank,
        )
        self.params = tuple((s.params[0].type.check, self.keyed[s.key][1]) for s in params)
        paths = [n for s, n in self.keyed.values() if s.kind == _PATH]
        self.catchall = paths[0] if paths else None
        self.static_only = not (self.mixed or self.params or self.catchall)
        if self.routes:
            self.leaf = _Leaf(self.routes)

    def children(self) -> list[_Node]:
        return [*self.static.values(), *(n for _, n in self.keyed.values())]


def _first_invalid(route: Route, segments: list[str]) -> _Param | None:
    """The first param of ``route`` (whose shape ``segments`` has) that fails its type."""
    for spec, text in zip(route._segments, segments, strict=False):
        if spec.kind == _PARAM:
            param = spec.params[0]
            if param.type.check is not None and not param.type.check(text):
                return param
        elif spec.kind == _MIXED and spec.shape is not None:
            found = spec.shape.fullmatch(text)
            values = found.groups() if found is not None else ()
            for param, value in zip(spec.params, values, strict=False):
                if param.type.check is not None and not param.type.check(value):
                    return param
    return None


# --- the router --------------------------------------------------------------


class Router:
    """Compiled routes; build with ``Router.compile``. Sync and pure: ``match``
    touches nothing but its arguments and two statistics counters."""

    __slots__ = (
        "_deprecations",
        "_depth",
        "_exact",
        "_lookups",
        "_nodes",
        "_root",
        "_routes",
        "_visits",
    )

    def __init__(
        self,
        root: _Node,
        routes: tuple[Route, ...],
        deprecations: dict[str, Headers],
        nodes: int,
        depth: int,
    ) -> None:
        self._root = root
        # Paths of wholly static routes -> their leaf: the commonest case, no walk.
        self._exact: dict[str, _Leaf] = {}
        for route in routes:
            if all(s.kind == _STATIC for s in route._segments):
                node = root
                for segment in route._segments:
                    node = node.static[segment.text]
                if node.leaf is not None:
                    self._exact[route.config.path] = node.leaf
        self._routes = routes
        self._deprecations = deprecations
        self._nodes = nodes
        self._depth = depth
        self._lookups = 0
        self._visits = 0

    @classmethod
    def compile(
        cls, routes: Sequence[RouteConfig], api_versions: Mapping[str, ApiVersionConfig]
    ) -> Router:
        """Build the trie; raise ``ConfigError`` listing every problem."""
        problems: list[tuple[int, int, FieldError]] = []

        def problem(index: int, path: str, message: str) -> None:
            problems.append((index, len(problems), FieldError(path, message)))

        deprecations = {
            version: _deprecation_headers(config)
            for version, config in api_versions.items()
            if config.deprecated or config.sunset is not None
        }
        root = _Node()
        compiled: list[Route] = []
        for index, config in enumerate(routes):
            where = f"routes[{index}]"
            segments, errors = _parse_path(config.path)
            for message in errors:
                problem(index, f"{where}.path", message)
            names = None if errors else tuple(p.name for s in segments for p in s.params)
            if names is not None and "version" in names and config.version is not None:
                problem(
                    index,
                    f"{where}.version",
                    "a route with a {version} path parameter takes its version from the path",
                )
            rewrite = None
            if config.upstream_path is not None:
                errors = []
                rewrite = _rewrite_template(config.upstream_path, names, errors)
                for message in errors:
                    problem(index, f"{where}.upstream_path", message)
            if names is None:
                continue
            version_param = names.index("version") if "version" in names else None
            version_type = (
                next(p.type.key for s in segments for p in s.params if p.name == "version")
                if version_param is not None
                else None
            )
            route = Route(
                name=config.name,
                index=index,
                config=config,
                methods=frozenset(config.methods) if config.methods else None,
                version=config.version,
                param_names=names,
                deprecation_headers=(
                    deprecations.get(config.version, _NO_HEADERS)
                    if config.version is not None
                    else _NO_HEADERS
                ),
                _segments=tuple(segments),
                _version_param=version_param,
                _version_is_int=version_type == "int",
                _rewrite=rewrite,
            )
            compiled.append(route)
            node = root
            for segment in segments:
                node = node.child(segment)
            node.routes.append(route)

        nodes, depth = 0, 0
        stack = [(root, 0)]
        while stack:
            node, level = stack.pop()
            nodes += 1
            depth = max(depth, level)
            node.freeze()
            for a_pos, b in enumerate(node.routes):
                for a in node.routes[:a_pos]:
                    overlap = a.methods is None or b.methods is None or a.methods & b.methods
                    if a.version == b.version and overlap:
                        problem(
                            b.index,
                            f"routes[{b.index}]",
                            f"can never be told apart from routes[{a.index}]",
                        )
                        break
            stack.extend((child, level + 1) for child in node.children())
        if problems:
            problems.sort(key=lambda p: (p[0], p[1]))
            raise ConfigError([p[2] for p in problems], source="routes")
        return cls(root, tuple(compiled), deprecations, nodes, depth)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def statistics(self) -> RouterStatistics:
        return RouterStatistics(
            routes=len(self._routes),
            nodes=self._nodes,
            max_depth=self._depth,
            lookups=self._lookups,
            nodes_visited=self._visits,
        )

    def __repr__(self) -> str:
        return f"<Router {len(self._routes)} routes, {self._nodes} nodes>"

    def match(self, method: str, path: str, accept_version: str | None = None) -> Match:
        """The route for this request, or raise RouteNotFound (404),
        InvalidPathParameter (400) or MethodNotAllowed (405)."""
        self._lookups += 1
        if path[:1] != "/":
            raise RouteNotFound(f"no route for {method} {path}")
        leaf = self._exact.get(path)
        if leaf is not None:
            # A wholly static route is the walk's first leaf when it exists
            # (static edges come first at every level), so one dict probe
            # finds it; when it does not take this method, walk as usual.
            route = leaf.resolve(method, accept_version)
            if route is not None:
                return Match(route, {}, route.version, route.deprecation_headers, path)
        segments = path[1:].split("/")
        values: list[str] = []
        route = self._walk(self._root, segments, 0, values, method, accept_version)
        if route is None:
            self._fail(method, path, segments, accept_version)
        if route._version_param is None:
            version = route.version
            headers = route.deprecation_headers
        else:
            version = values[route._version_param]
            if route._version_is_int:
                version = _canonical_int(version)
            headers = self._deprecations.get(version, _NO_HEADERS)
        # The walk captures exactly one value per name. Most routes have zero or
        # one param, and dict(zip()) costs five times a literal, on every request.
        count = len(values)
        if count == 1:
            params = {route.param_names[0]: values[0]}
        elif count == 0:
            params = {}
        else:
            params = dict(zip(route.param_names, values, strict=False))
        return Match(route, params, version, headers, path)

    def rewrite(self, match: Match) -> str:
        """The upstream path: the route's ``upstream_path`` with raw param text
        substituted, or the request path unchanged."""
        template = match.route._rewrite
        return match.path if template is None else template.format_map(match.params)

    # The hot path: depth-first, most specific child first, stops at the first
    # leaf that has a route for this method and version.
    def _walk(
        self,
        node: _Node,
        segments: list[str],
        i: int,
        values: list[str],
        method: str,
        accept: str | None,
    ) -> Route | None:
        end = len(segments)
        visited = 1
        # A node with only static edges leaves nothing to backtrack to, so
        # descend through those in a loop: a Python call costs more than a probe.
        while node.static_only and i < end:
            next_node = node.static.get(segments[i])
            if next_node is None:
                self._visits += visited
                return None
            node = next_node
            i += 1
            visited += 1
        self._visits += visited
        if i == end:
            leaf = node.leaf
            return None if leaf is None else leaf.resolve(method, accept)
        segment = segments[i]
        child = node.static.get(segment)
        if child is not None:
            found = self._walk(child, segments, i + 1, values, method, accept)
            if found is not None:
                return found
        if not segment:
            return None  # '//' or a trailing '/': params never take an empty segment
        mark = len(values)
        for pattern, groups, child, _ in node.mixed:
            matched = pattern.fullmatch(segment)
            if matched is not None:
                if groups is None:
                    values.extend(matched.groups())
                else:
                    values.extend(matched.group(g) for g in groups)
                found = self._walk(child, segments, i + 1, values, method, accept)
                if found is not None:
                    return found
                del values[mark:]
        for check, child in node.params:
            if check is None or check(segment):
                values.append(segment)
                found = self._walk(child, segments, i + 1, values, method, accept)
                if found is not None:
                    return found
                del values[mark:]
        if node.catchall is not None:
            values.append("/".join(segments[i:]))
            found = self._walk(node.catchall, segments, end, values, method, accept)
            if found is not None:
                return found
            del values[mark:]
        return None

    # The error paths: only run once the fast walk has failed.
    def _leaves(
        self, node: _Node, segments: list[str], i: int, typed: bool, out: list[_Leaf]
    ) -> None:
        """Every leaf the path reaches, in precedence order; with ``typed``
        false every param takes any non-empty segment (the route's shape)."""
        if i == len(segments):
            if node.leaf is not None:
                out.append(node.leaf)
            return
        segment = segments[i]
        child = node.static.get(segment)
        if child is not None:
            self._leaves(child, segments, i + 1, typed, out)
        if not segment:
            return
        for pattern, _, child, shape in node.mixed:
            if (pattern if typed else shape).fullmatch(segment) is not None:
                self._leaves(child, segments, i + 1, typed, out)
        for check, child in node.params:
            if not typed or check is None or check(segment):
                self._leaves(child, segments, i + 1, typed, out)
        if node.catchall is not None:
            self._leaves(node.catchall, segments, len(segments), typed, out)

    def _fail(self, method: str, path: str, segments: list[str], accept: str | None) -> NoReturn:
        leaves: list[_Leaf] = []
        self._leaves(self._root, segments, 0, True, leaves)
        if leaves:
            allowed: set[str] = set()
            for leaf in leaves:
                if leaf.allow is None:
                    allowed.clear()
                    break
                allowed |= leaf.allow
            if allowed and method not in allowed:
                raise MethodNotAllowed(
                    sorted(allowed),
                    f"{method} is not allowed here; allowed: {', '.join(sorted(allowed))}",
                )
            versions: set[str] = set()
            for leaf in leaves:
                table = leaf.tables.get(method, leaf.other)
                if table is not None:
                    versions |= table.versions.keys()
            available = ", ".join(sorted(versions, key=_version_key))
            raise RouteNotFound(
                f"no version {accept!r} of {method} {path}; available versions: {available}",
                available_versions=sorted(versions, key=_version_key),
            )
        self._leaves(self._root, segments, 0, False, leaves)
        for leaf in leaves:
            route = min(leaf.routes, key=lambda r: r.index)
            param = _first_invalid(route, segments)
            if param is not None:
                raise InvalidPathParameter(
                    f"path parameter {param.name!r} must {param.type.expected}",
                    parameter=param.name,
                )
        raise RouteNotFound(f"no route for {method} {path}")
