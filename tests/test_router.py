"""The router: precedence, param types, versions, errors and compile checks.

Everything here is pure and sync: a router is compiled from RouteConfigs and
asked to match (method, raw path, Accept-Version).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from triogate.config import ApiVersionConfig, HttpMethod, RouteConfig
from triogate.errors import ConfigError, InvalidPathParameter, MethodNotAllowed, RouteNotFound
from triogate.policy.router import Match, Router

UUID = "123e4567-e89b-12d3-a456-426614174000"


def rc(
    path: str,
    methods: Sequence[HttpMethod] = (),
    *,
    name: str | None = None,
    version: str | None = None,
    upstream_path: str | None = None,
) -> RouteConfig:
    return RouteConfig(
        name=name or path,
        path=path,
        upstream="up",
        methods=list(methods),
        version=version,
        upstream_path=upstream_path,
    )


def build(*routes: RouteConfig, api_versions: dict[str, ApiVersionConfig] | None = None) -> Router:
    return Router.compile(routes, api_versions or {})


def name_of(router: Router, path: str, method: str = "GET", accept: str | None = None) -> str:
    return router.match(method, path, accept).route.name


def compile_errors(*routes: RouteConfig) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(*routes)
    assert info.value.source == "routes"
    return info.value.lines()


# --- precedence and backtracking ----------------------------------------------

PRECEDENCE_ROUTES = [
    rc("/p/{rest:path}", name="path"),
    rc("/p/{slug:re:[a-z]+}", name="regex"),
    rc("/p/{name}", name="str"),
    rc("/p/{id:int}", name="int"),
    rc("/p/{id:uuid}", name="uuid"),
    rc("/p/{name}.json", name="mixed"),
    rc("/p/me", name="static"),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["config-order", "reversed"])
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/p/me", "static"),
        ("/p/me.json", "mixed"),
        ("/p/42", "int"),
        ("/p/-42", "int"),
        (f"/p/{UUID}", "uuid"),
        ("/p/abc", "str"),  # plain params come before regex params
        ("/p/a/b", "path"),
        ("/p/me/", "path"),
    ],
)
def test_precedence_does_not_depend_on_config_order(
    reverse: bool, path: str, expected: str
) -> None:
    routes = PRECEDENCE_ROUTES[::-1] if reverse else PRECEDENCE_ROUTES
    assert name_of(build(*routes), path) == expected


def test_static_beats_param_and_catch_all_takes_the_rest() -> None:
    router = build(
        rc("/users/{id}", ["GET"], name="user"),
        rc("/users/me", ["GET"], name="me"),
        rc("/files/{p:path}", name="files"),
        rc("/files/readme", ["GET"], name="readme"),
    )
    assert name_of(router, "/users/me") == "me"
    assert name_of(router, "/users/you") == "user"
    assert name_of(router, "/files/readme") == "readme"
    assert name_of(router, "/files/readme/more") == "files"
    # The catch-all also takes a method the more specific route refuses.
    assert name_of(router, "/files/readme", "PUT") == "files"


def test_regex_reached_when_str_fails_deeper() -> None:
    router = build(
        rc("/t/{name}/info", name="str"),
        rc("/t/{code:re:[A-Z]{3}}/rate", name="regex"),
    )
    assert name_of(router, "/t/EUR/info") == "str"
    assert name_of(router, "/t/EUR/rate") == "regex"


def test_backtracking_tries_the_next_candidate() -> None:
    router = build(
        rc("/a/me/x", name="static-x"),
        rc("/a/{id}/y", name="param-y"),
        rc("/a/{n:int}.json/z", name="mixed-z"),
        rc("/a/{n:int}/z", name="int-z"),
        rc("/a/{rest:path}", name="catch-all"),
    )
    assert name_of(router, "/a/me/x") == "static-x"
    assert name_of(router, "/a/me/y") == "param-y"  # static 'me' fails deeper
    assert name_of(router, "/a/7.json/z") == "mixed-z"
    assert name_of(router, "/a/7/z") == "int-z"  # str {id} has only /y below it
    m = router.match("GET", "/a/me/z")
    assert (m.route.name, m.params) == ("catch-all", {"rest": "me/z"})


def test_backtracking_restores_captured_params() -> None:
    router = build(
        rc("/{a}/{b}/x", name="x"),
        rc("/{c:int}/{d}/y", name="y"),
    )
    # {a} (str) is tried after {c:int}; the values captured on the failed
    # branch must not leak into the next one.
    assert router.match("GET", "/1/2/x").params == {"a": "1", "b": "2"}
    assert router.match("GET", "/1/2/y").params == {"c": "1", "d": "2"}


# --- parameter types ------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "good", "bad", "expected"),
    [
        ("/{v:int}", ["0", "42", "-7", "0042"], ["4a", "-", "+1", "1.5", "²", "١٢"], "be an int"),
        (
            "/{v:uuid}",
            [UUID, UUID.upper()],
            [UUID.replace("-", ""), UUID[:-1], UUID + "0", "g" + UUID[1:]],
            "be a UUID",
        ),
        ("/{v}", ["a", "a.b", "%20", "-"], [], ""),
        ("/{v:re:[a-z]+}", ["abc"], ["ABC", "abc1", "ab-c"], "match the pattern '[a-z]+'"),
        ("/{v:re:[0-9]{2}}", ["12"], ["1", "123"], "match the pattern '[0-9]{2}'"),
    ],
)
def test_param_types(template: str, good: list[str], bad: list[str], expected: str) -> None:
    router = build(rc(template))
    for value in good:
        assert router.match("GET", "/" + value).params == {"v": value}
    for value in bad:
        with pytest.raises(InvalidPathParameter) as info:
            router.match("GET", "/" + value)
        assert info.value.detail == f"path parameter 'v' must {expected}"
        assert info.value.extra == {"parameter": "v"}


def test_invalid_parameter_is_400_with_name_and_type() -> None:
    router = build(rc("/users/{id:int}", ["GET"]), rc("/users/{id:int}/posts", ["GET"]))
    with pytest.raises(InvalidPathParameter) as info:
        router.match("GET", "/users/abc")
    exc = info.value
    assert exc.status == 400
    assert exc.code == "INVALID_PATH_PARAMETER"
    assert exc.detail == "path parameter 'id' must be an int"
    assert exc.problem("r1")["parameter"] == "id"
    with pytest.raises(InvalidPathParameter):
        router.match("GET", "/users/abc/posts")
    with pytest.raises(RouteNotFound):  # no route has this shape
        router.match("GET", "/users/abc/comments")


def test_a_typed_failure_is_not_400_when_another_route_matches() -> None:
    router = build(rc("/users/{id:int}", name="by-id"), rc("/users/{name}", name="by-name"))
    assert name_of(router, "/users/abc") == "by-name"


def test_mixed_segments() -> None:
    router = build(
        rc("/v{version:int}/users/{id:int}", ["GET"], name="users"),
        rc("/docs/{name}.{ext:re:json|yaml}", ["GET"], name="docs"),
        rc("/pics/{w:int}x{h:int}.png", ["GET"], name="pics"),
    )
    m = router.match("GET", "/v2/users/42")
    assert (m.route.name, m.params, m.version) == ("users", {"version": "2", "id": "42"}, "2")
    assert router.match("GET", "/docs/a.b.json").params == {"name": "a.b", "ext": "json"}
    assert router.match("GET", "/pics/640x480.png").params == {"w": "640", "h": "480"}
    with pytest.raises(InvalidPathParameter, match="'version' must be an int"):
        router.match("GET", "/vtwo/users/42")
    with pytest.raises(InvalidPathParameter, match="'id' must be an int"):
        router.match("GET", "/v2/users/x")
    with pytest.raises(InvalidPathParameter, match="'ext' must match"):
        router.match("GET", "/docs/a.xml")
    with pytest.raises(RouteNotFound):
        router.match("GET", "/docs/nodot")


def test_mixed_segment_with_capturing_groups_in_a_user_regex() -> None:
    router = build(rc("/f/{name:re:(ab|cd)+}-{n:int}"))
    assert router.match("GET", "/f/abcd-7").params == {"name": "abcd", "n": "7"}


def test_path_catch_all() -> None:
    router = build(rc("/files/{p:path}", upstream_path="/store/{p}"))
    cases = {"/files/a": "a", "/files/a/b/c": "a/b/c", "/files/a/": "a/", "/files/a//b": "a//b"}
    for path, rest in cases.items():
        m = router.match("GET", path)
        assert m.params == {"p": rest}
        assert router.rewrite(m) == "/store/" + rest
    for path in ["/files/", "/files", "/files//a"]:  # one or more chars, no empty first segment
        with pytest.raises(RouteNotFound):
            router.match("GET", path)


# --- raw paths ------------------------------------------------------------------


def test_paths_are_matched_raw() -> None:
    router = build(
        rc("/caf%C3%A9", name="cafe"), rc("/u/{name}", name="user"), rc("/", name="root")
    )
    assert name_of(router, "/caf%C3%A9") == "cafe"
    with pytest.raises(RouteNotFound):
        router.match("GET", "/café")
    assert router.match("GET", "/u/a%2Fb").params == {"name": "a%2Fb"}
    assert name_of(router, "/") == "root"
    for path in ["/u/", "/u//", "//u/x", "", "u/x", "*"]:
        with pytest.raises(RouteNotFound):
            router.match("GET", path)


def test_trailing_slash_is_significant() -> None:
    router = build(rc("/users", name="plain"), rc("/users/", name="slash"))
    assert name_of(router, "/users") == "plain"
    assert name_of(router, "/users/") == "slash"
    only_plain = build(rc("/users/{id}"))
    with pytest.raises(RouteNotFound):
        only_plain.match("GET", "/users/1/")


# --- methods: 404 / 400 / 405 -------------------------------------------------------


def test_405_lists_allowed_methods_with_head_for_get() -> None:
    router = build(
        rc("/users/{id:int}", ["GET", "DELETE"]),
        rc("/users/{id:int}", ["PATCH"], name="patch"),
        rc("/users/me", ["PUT"], name="me"),
    )
    with pytest.raises(MethodNotAllowed) as info:
        router.match("POST", "/users/7")
    assert info.value.status == 405
    assert info.value.headers == {"Allow": "DELETE, GET, HEAD, PATCH"}
    # 'me' is not an int, so only the static route's methods are allowed.
    with pytest.raises(MethodNotAllowed) as info:
        router.match("GET", "/users/me")
    assert info.value.headers == {"Allow": "PUT"}
    assert name_of(router, "/users/7", "HEAD") == "/users/{id:int}"
    assert name_of(router, "/users/7", "PATCH") == "patch"


def test_405_allow_is_the_union_over_every_matching_route() -> None:
    router = build(rc("/f/readme", ["GET"]), rc("/f/{p:path}", ["POST"]))
    with pytest.raises(MethodNotAllowed) as info:
        router.match("DELETE", "/f/readme")
    assert info.value.headers["Allow"] == "GET, HEAD, POST"


def test_empty_methods_allow_every_method() -> None:
    router = build(rc("/any", name="any"), rc("/get", ["GET"]))
    for method in ["GET", "HEAD", "POST", "OPTIONS", "PROPFIND"]:
        assert name_of(router, "/any", method) == "any"
    with pytest.raises(MethodNotAllowed) as info:
        router.match("PROPFIND", "/get")
    assert info.value.headers["Allow"] == "GET, HEAD"


def test_an_explicit_head_route_wins_over_get() -> None:
    router = build(rc("/x", ["GET"], name="get"), rc("/x", ["HEAD"], name="head"))
    assert name_of(router, "/x", "HEAD") == "head"
    assert name_of(router, "/x", "GET") == "get"


def test_404_400_405_order() -> None:
    router = build(rc("/users/{id:int}", ["GET"]))
    with pytest.raises(RouteNotFound) as not_found:
        router.match("GET", "/orders/1")
    assert not_found.value.status == 404
    assert not_found.value.code == "ROUTE_NOT_FOUND"
    with pytest.raises(InvalidPathParameter):
        router.match("GET", "/users/x")
    with pytest.raises(MethodNotAllowed):
        router.match("POST", "/users/1")


def test_empty_router_finds_nothing() -> None:
    router = build()
    with pytest.raises(RouteNotFound):
        router.match("GET", "/")
    assert router.statistics().routes == 0


# --- versions -----------------------------------------------------------------------


def test_accept_version_selects_among_routes_with_the_same_shape() -> None:
    router = build(
        rc("/items", ["GET"], name="v1", version="1"),
        rc("/items", ["GET"], name="v10", version="10"),
        rc("/items", ["GET"], name="v9", version="9"),
        rc("/items", ["POST"], name="post"),
    )
    assert name_of(router, "/items") == "v10"  # highest, compared as numbers
    assert name_of(router, "/items", accept="9") == "v9"
    m = router.match("GET", "/items", "1")
    assert (m.route.name, m.version, m.route.version) == ("v1", "1", "1")
    # An unversioned route ignores the header.
    assert name_of(router, "/items", "POST", accept="9") == "post"
    with pytest.raises(RouteNotFound) as info:
        router.match("GET", "/items", "3")
    assert info.value.detail == "no version '3' of GET /items; available versions: 1, 9, 10"
    assert info.value.extra == {"available_versions": ["1", "9", "10"]}


def test_unversioned_route_is_the_default_and_versions_compare_as_text() -> None:
    router = build(
        rc("/r", name="plain"),
        rc("/r", name="beta", version="beta"),
        rc("/r", name="alpha", version="alpha"),
    )
    assert name_of(router, "/r") == "plain"
    assert name_of(router, "/r", accept="alpha") == "alpha"
    no_plain = build(rc("/r", name="beta", version="beta"), rc("/r", name="alpha", version="alpha"))
    assert name_of(no_plain, "/r") == "beta"


def test_version_from_the_path_ignores_accept_version() -> None:
    router = build(rc("/v{version:int}/users", ["GET"]), rc("/api/{version}/ping"))
    m = router.match("GET", "/v3/users", "7")
    assert (m.version, m.route.version) == ("3", None)
    assert router.match("GET", "/v03/users").version == "3"  # the int, not the text
    assert router.match("GET", "/v03/users").params == {"version": "03"}
    assert router.match("GET", "/api/beta/ping").version == "beta"


def test_accept_version_backtracks_to_a_less_specific_route() -> None:
    router = build(
        rc("/u/me", ["GET"], name="me-v2", version="2"),
        rc("/u/{id}", ["GET"], name="id"),
    )
    assert name_of(router, "/u/me") == "me-v2"
    assert name_of(router, "/u/me", accept="2") == "me-v2"
    assert name_of(router, "/u/me", accept="1") == "id"


def test_deprecation_headers() -> None:
    sunset = datetime(2027, 6, 30, tzinfo=UTC)
    api_versions = {
        "1": ApiVersionConfig(deprecated=True, sunset=sunset),
        "2": ApiVersionConfig(sunset=datetime(2028, 1, 1, 12, 30, tzinfo=UTC)),
        "3": ApiVersionConfig(),
    }
    router = build(
        rc("/v{version:int}/users"),
        rc("/items", version="1"),
        rc("/items", version="3"),
        api_versions=api_versions,
    )
    both = (("Deprecation", "true"), ("Sunset", "Wed, 30 Jun 2027 00:00:00 GMT"))
    assert router.match("GET", "/v1/users").deprecation_headers == both
    assert router.match("GET", "/v001/users").deprecation_headers == both
    assert router.match("GET", "/v2/users").deprecation_headers == (
        ("Sunset", "Sat, 01 Jan 2028 12:30:00 GMT"),
    )
    assert router.match("GET", "/v3/users").deprecation_headers == ()
    assert router.match("GET", "/v4/users").deprecation_headers == ()
    assert router.match("GET", "/items", "1").deprecation_headers == both
    assert router.match("GET", "/items").deprecation_headers == ()  # default: 3
    assert router.routes[1].deprecation_headers == both  # computed at compile time


# --- rewrite ---------------------------------------------------------------------------


def test_rewrite() -> None:
    router = build(
        rc("/v{version:int}/users/{id:int}", ["GET"], upstream_path="/users/{id}?v={version}"),
        rc("/api/{svc}/{rest:path}", upstream_path="/{svc}/internal/{rest}"),
        rc("/plain/{name}"),
        rc("/braces", upstream_path="/x"),
    )
    assert router.rewrite(router.match("GET", "/v2/users/7")) == "/users/7?v=2"
    m = router.match("GET", "/api/billing/a/b%20c")
    assert router.rewrite(m) == "/billing/internal/a/b%20c"
    assert router.rewrite(router.match("GET", "/plain/a%2Fb")) == "/plain/a%2Fb"
    assert router.rewrite(router.match("GET", "/braces")) == "/x"


def test_rewrite_does_not_evaluate_params() -> None:
    # Param text is inserted as-is, never formatted again.
    router = build(rc("/r/{x}", upstream_path="/s/{x}"))
    assert router.rewrite(router.match("GET", "/r/{x}{0}")) == "/s/{x}{0}"


# --- the Match and Route objects ---------------------------------------------------


def test_match_exposes_route_details() -> None:
    config = rc("/users/{id:int}", ["GET", "POST"], name="users")
    router = build(rc("/other"), config)
    m = router.match("POST", "/users/5")
    assert isinstance(m, Match)
    assert m.route.name == "users"
    assert m.route.index == 1
    assert m.route.config is config
    assert m.route.methods == frozenset({"GET", "POST"})
    assert m.route.version is None
    assert m.route.param_names == ("id",)
    assert m.path == "/users/5"
    assert router.match("GET", "/other").route.methods is None
    assert router.routes[0].allows("PROPFIND")
    assert m.route.allows("HEAD") and not m.route.allows("DELETE")


# --- compile errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (rc("/x/{n:flaot}"), "routes[0].path: unknown parameter type 'flaot'"),
        (rc("/u/{id}/{id:int}"), "routes[0].path: duplicate parameter name 'id'"),
        (rc("/a/{x:path}/b"), "routes[0].path: a {x:path} parameter must be the last segment"),
        (rc("/a/x{rest:path}"), "routes[0].path: a {rest:path} parameter must fill its segment"),
        (rc("/b/{"), "routes[0].path: unbalanced '{' at position 3"),
        (rc("/c}"), "routes[0].path: unbalanced '}' at position 2"),
        (rc("/{}"), "routes[0].path: invalid parameter name ''"),
        (rc("/{a-b}"), "routes[0].path: invalid parameter name 'a-b'"),
        (rc("/{a:re:}"), "routes[0].path: invalid regex for parameter 'a': empty"),
        (
            rc("/p/{id}", upstream_path="/q/{uid}"),
            "routes[0].upstream_path: unknown parameter 'uid'",
        ),
        (
            rc("/p/{id}", upstream_path="/q/{id"),
            "routes[0].upstream_path: unbalanced '{' at position 3",
        ),
        (
            rc("/v{version:int}/x", version="1"),
            "routes[0].version: a route with a {version} path parameter"
            " takes its version from the path",
        ),
    ],
)
def test_compile_errors(route: RouteConfig, message: str) -> None:
    assert compile_errors(route) == [message]


def test_invalid_regex_errors() -> None:
    [message] = compile_errors(rc("/r/{s:re:[a-z}"))
    assert message.startswith("routes[0].path: invalid regex '[a-z': ")
    # RE2 syntax: no backreferences, no lookaround (see test_router_regex.py).
    [message] = compile_errors(rc("/m/a{x:re:(b)\\1}"))
    assert message.startswith(r"routes[0].path: invalid regex '(b)\\1': ")


def test_every_error_is_reported_in_route_order() -> None:
    errors = compile_errors(
        rc("/ok/{a}"),
        rc("/x/{n:flaot}/{m:uuid}/{m}", upstream_path="/{zz}"),
        rc("/a/{x:path}/b"),
        rc("/fine/{uid}", upstream_path="/{uid}/{nope}"),
    )
    assert errors == [
        "routes[1].path: unknown parameter type 'flaot'",
        "routes[1].path: duplicate parameter name 'm'",
        "routes[2].path: a {x:path} parameter must be the last segment",
        "routes[3].upstream_path: unknown parameter 'nope'",
    ]


def test_too_many_segments() -> None:
    [message] = compile_errors(rc("/a" * 129))
    assert message == "routes[0].path: more than 128 segments"


# --- ambiguity -----------------------------------------------------------------------


def test_routes_that_can_never_be_told_apart() -> None:
    errors = compile_errors(
        rc("/a", ["GET"]),
        rc("/users/{id:int}", ["GET"]),
        rc("/b", ["POST"]),
        rc("/c/{rest:path}"),
        rc("/users/{uid:int}", ["GET", "POST"]),  # other name, same shape
        rc("/c/{other:path}", ["PUT"]),  # no methods = every method
        rc("/d/{x:re:[0-9]+}.json", version="2"),
        rc("/d/{y:re:[0-9]+}.json", version="2"),
    )
    assert errors == [
        "routes[4]: can never be told apart from routes[1]",
        "routes[5]: can never be told apart from routes[3]",
        "routes[7]: can never be told apart from routes[6]",
    ]


def test_each_duplicate_is_reported_once() -> None:
    errors = compile_errors(rc("/x"), rc("/x"), rc("/x"))
    assert errors == [
        "routes[1]: can never be told apart from routes[0]",
        "routes[2]: can never be told apart from routes[0]",
    ]


def test_routes_that_can_be_told_apart() -> None:
    router = build(
        rc("/x", ["GET"], name="get"),
        rc("/x", ["POST", "PUT"], name="write"),
        rc("/x", ["HEAD"], name="head"),  # explicit HEAD beats GET's implicit one
        rc("/y", ["GET"], name="y1", version="1"),
        rc("/y", ["GET"], name="y2", version="2"),
        rc("/y", ["GET"], name="y"),
        rc("/z/{n:int}", name="int"),  # different types: different shapes
        rc("/z/{n:re:-?[0-9]+}", name="re"),
        rc("/z/{n}", name="str"),
    )
    assert name_of(router, "/x", "PUT") == "write"
    assert name_of(router, "/y", accept="2") == "y2"
    assert name_of(router, "/z/1") == "int"


# --- the walk against a brute-force reference ------------------------------------

# Rank of a segment kind; the route to win is the one whose ranks, segment by
# segment, are smallest (that is what depth-first with backtracking finds).
_RANKS = {"static": 0, "int": 1, "str": 2, "path": 3}


def _reference(routes: list[tuple[list[tuple[str, str]], bool]], path: str) -> int | str:
    """Index of the winning route, or the error class a brute-force scan finds."""
    segments = path[1:].split("/")

    def ranks(shape: list[tuple[str, str]], typed: bool) -> list[int] | None:
        out = []
        for j, (kind, text) in enumerate(shape):
            if j >= len(segments) or (kind != "static" and not segments[j]):
                return None
            seg = segments[j]
            if (kind == "static" and seg != text) or (
                typed and kind == "int" and not (seg.lstrip("-").isdigit() and seg.isascii())
            ):
                return None
            out.append(_RANKS[kind])
            if kind == "path":
                return out
        return out if len(shape) == len(segments) else None

    typed = [(ranks(shape, True), i, get) for i, (shape, get) in enumerate(routes)]
    found = sorted((r, i) for r, i, get in typed if r is not None and get)
    if found:
        return found[0][1]
    if any(r is not None for r, _, _ in typed):
        return "405"
    return "400" if any(ranks(shape, False) is not None for shape, _ in routes) else "404"


def test_random_tables_agree_with_a_brute_force_reference() -> None:
    rng = random.Random(20261127)
    for _ in range(300):
        shapes: dict[str, tuple[list[tuple[str, str]], bool]] = {}
        for _ in range(rng.randint(1, 8)):
            size = rng.randint(1, 3)
            shape: list[tuple[str, str]] = []
            for j in range(size):
                last = ["path"] if j == size - 1 else []  # {x:path} only at the end
                kind = rng.choice(["static", "static", "int", "str", *last])
                shape.append((kind, rng.choice(["a", "b", "1", ""]) if kind == "static" else ""))
            template = "/" + "/".join(
                text if kind == "static" else f"{{p{j}:{kind}}}"
                for j, (kind, text) in enumerate(shape)
            )
            shapes.setdefault(template, (shape, rng.random() < 0.7))
        routes = list(shapes.values())
        router = build(*(rc(t, ["GET"] if get else ["POST"]) for t, (_, get) in shapes.items()))
        for _ in range(20):
            parts = rng.choices(["a", "b", "1", "-2", "x", ""], k=rng.randint(1, 4))
            path = "/" + "/".join(parts)
            try:
                got: int | str = router.match("GET", path).route.index
            except MethodNotAllowed:
                got = "405"
            except InvalidPathParameter:
                got = "400"
            except RouteNotFound:
                got = "404"
            assert got == _reference(routes, path), (path, list(shapes))


# --- scale: cost must not grow with the number of routes -----------------------------


def service_routes(count: int) -> list[RouteConfig]:
    routes = []
    for i in range(count):
        routes.append(rc(f"/svc{i}/items/{{id:int}}", ["GET"], name=f"items-{i}"))
        if i % 2:
            routes.append(rc(f"/svc{i}/items/latest", ["GET"], name=f"latest-{i}"))
        if i % 3:
            routes.append(rc(f"/svc{i}/status", name=f"status-{i}"))
    return routes


def visits(router: Router, path: str) -> int:
    before = router.statistics().nodes_visited
    router.match("GET", path)
    return router.statistics().nodes_visited - before


def test_a_thousand_services() -> None:
    router = build(*service_routes(1000))
    assert router.statistics().routes == 1000 + 500 + 666
    for i in [0, 1, 7, 500, 998, 999]:
        m = router.match("GET", f"/svc{i}/items/{i * 3}")
        assert (m.route.name, m.params) == (f"items-{i}", {"id": str(i * 3)})
        if i % 2:
            assert name_of(router, f"/svc{i}/items/latest") == f"latest-{i}"
        else:
            with pytest.raises(InvalidPathParameter):
                router.match("GET", f"/svc{i}/items/latest")
        if i % 3:
            assert name_of(router, f"/svc{i}/status", "DELETE") == f"status-{i}"
    with pytest.raises(RouteNotFound):
        router.match("GET", "/svc1000/items/1")
    with pytest.raises(MethodNotAllowed):
        router.match("POST", "/svc7/items/1")


def test_lookup_cost_does_not_grow_with_routes() -> None:
    small = build(*service_routes(10))
    large = build(*service_routes(1000))
    assert large.statistics().nodes > 50 * small.statistics().nodes
    for path in ["/svc7/items/42", "/svc7/items/latest", "/svc5/status"]:
        assert visits(small, path) == visits(large, path)
    # root, svc7, items, {id:int}: one node per path segment (plus the root).
    assert visits(large, "/svc7/items/42") == 4
    # Wholly static paths are one dict probe on the whole path: no node at all.
    assert visits(large, "/svc7/items/latest") == 0


def test_statistics_and_repr() -> None:
    router = build(rc("/a/{x:int}"), rc("/a/b"), rc("/c"))
    stats = router.statistics()
    assert (stats.routes, stats.nodes, stats.max_depth) == (3, 5, 2)
    assert repr(router) == "<Router 3 routes, 5 nodes>"
    router.match("GET", "/a/1")
    router.match("GET", "/c")
    assert router.statistics().lookups == 2
