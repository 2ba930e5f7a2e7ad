"""Request routing: (method, raw path, Accept-Version) -> route, params, version.

Three modules: ``routetemplate`` parses route templates (typed segments,
rewrites, versions), ``routetable`` holds the compiled trie (``Route``,
``Match``, nodes and leaves), and this one builds and walks it (``Router``).

Theory of operation
-------------------
``Router.compile`` turns the ``[[routes]]`` table into a trie once per config;
``Router.match`` walks it on every proxied request. A trie level is one path
segment (the text between two ``/``), and every node has, in precedence order:

1. ``static``: a dict from exact segment text to child. Most routes are mostly
   static, so lookup is one dict probe per segment and the cost does not grow
   with the number of routes.
2. ``mixed``: segments with literal text around params (``v{version:int}``,
   ``{name}.json``), one compiled regex each, on RE2 (linear time: with a
   backtracking engine ``{a}-{b}.json`` against a long run of ``-`` would
   freeze the gateway, see ``userregex``); more literal text first.
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

Path parameters (``/private;x/data``, ``;`` also as ``%3B``) only get here
with ``server.allow_path_parameters`` on (the front doors refuse them
otherwise, see ``http.check_target``). Servlet containers serve such a path
as ``/private/data``, so each segment is matched without its ``;…``
(``routing_segments``): the route that authorises the request is the one
whose path the upstream serves. ``Match.path`` keeps them (the upstream gets
them); captured params do not. A route template with ``;`` in its literal
text could never match, so it is a load error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NoReturn

from triogate.config import ApiVersionConfig, RouteConfig
from triogate.errors import (
    ConfigError,
    FieldError,
    InvalidPathParameter,
    MethodNotAllowed,
    RouteNotFound,
)
from triogate.policy.routetable import Leaf, Match, Node, Route, RouterStatistics, first_invalid
from triogate.policy.routetemplate import (
    NO_HEADERS,
    STATIC,
    Headers,
    canonical_int,
    deprecation_headers_for,
    parse_path,
    rewrite_template,
    version_key,
)

__all__ = ["Match", "Route", "Router", "RouterStatistics", "routing_segments"]


def routing_segments(path: str) -> list[str]:
    """The segments of ``path`` (after its leading ``/``) as routed: each
    without its path parameters (``;…``, also ``%3B…``)."""
    segments = path[1:].split("/")
    # '%3' is rare: '%3B' and '%3b' in one test (Router.match inlines this).
    if ";" in path or "%3" in path:
        segments = _without_parameters(segments)
    return segments


def _without_parameters(segments: list[str]) -> list[str]:
    return [s.split(";", 1)[0].split("%3B", 1)[0].split("%3b", 1)[0] for s in segments]


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
        root: Node,
        routes: tuple[Route, ...],
        deprecations: dict[str, Headers],
        nodes: int,
        depth: int,
    ) -> None:
        self._root = root
        # Paths of wholly static routes -> their leaf: the commonest case, no walk.
        self._exact: dict[str, Leaf] = {}
        for route in routes:
            if all(s.kind == STATIC for s in route._segments):
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
            version: deprecation_headers_for(config)
            for version, config in api_versions.items()
            if config.deprecated or config.sunset is not None
        }
        root = Node()
        compiled: list[Route] = []
        for index, config in enumerate(routes):
            where = f"routes[{index}]"
            segments, errors = parse_path(config.path)
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
                rewrite = rewrite_template(config.upstream_path, names, errors)
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
                    deprecations.get(config.version, NO_HEADERS)
                    if config.version is not None
                    else NO_HEADERS
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
        segments = path[1:].split("/")  # routing_segments(path), inlined
        if ";" in path or "%3" in path:
            segments = _without_parameters(segments)
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
                version = canonical_int(version)
            headers = self._deprecations.get(version, NO_HEADERS)
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
        node: Node,
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
        self, node: Node, segments: list[str], i: int, typed: bool, out: list[Leaf]
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
        leaves: list[Leaf] = []
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
            available = ", ".join(sorted(versions, key=version_key))
            raise RouteNotFound(
                f"no version {accept!r} of {method} {path}; available versions: {available}",
                available_versions=sorted(versions, key=version_key),
            )
        self._leaves(self._root, segments, 0, False, leaves)
        for leaf in leaves:
            route = min(leaf.routes, key=lambda r: r.index)
            param = first_invalid(route, segments)
            if param is not None:
                raise InvalidPathParameter(
                    f"path parameter {param.name!r} must {param.type.expected}",
                    parameter=param.name,
                )
        raise RouteNotFound(f"no route for {method} {path}")
