"""Request-target normalisation (``check_target``): what is routed, and so
authorised, is what the upstream reads.

The attack this guards against: ``/public/%%32%65%%32%65/private/data.txt``
was decoded once by the gateway to ``/public/%2e%2e/private/data.txt``
(routed as public) and once more by the upstream to ``/public/../private``.
Now a ``%`` that does not start a two-hex-digit escape is a 400, and the
normalised form is a fixed point. Unit and property tests on the function,
then the attack through both real front doors to a fake upstream.

The second attack: ``/private;x/data`` (or ``/private%3Bx/data``) matched
the unprotected catch-all ``/{rest:path}`` (the segment is ``private;x``,
not ``private``), and Tomcat or Jetty served it as ``/private/data``. Path
parameters are now a 400; with ``server.allow_path_parameters`` they are
kept for the upstream and the router matches each segment without them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote_to_bytes, urlsplit

import h11
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from triogate.config import RouteConfig
from triogate.errors import BadRequest, ConfigError
from triogate.http import check_target
from triogate.policy.router import Router
from triogate.testing import FakeUpstream, Harness, open_harness

UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


# ---- the function -------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/public/%%32%65%%32%65/private/data.txt",
        b"/public/%%32%66private/data.txt",
        b"/public/%%35%63x",
        b"/public/%%30%30",
        b"/public/%%%32%65",
        b"/public/%2%65%2%65/private",
        b"/a%",
        b"/a%2",
        b"/a%2/b",
        b"/a%g0",
        b"/a%0g",
        b"/a%%",
        b"/a% 20",
        b"/a%\xff",
    ],
)
def test_a_percent_without_two_hex_digits_is_refused(target: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        check_target(target)
    assert caught.value.status == 400
    assert caught.value.code == "BAD_REQUEST"


@pytest.mark.parametrize(
    "target",
    [
        b"/a/%2e%2e/b",
        b"/a/%2E./b",
        b"/a/.%2e",
        b"/a/%2e",
        b"/a/..;x/b",
        b"/a/%2e%2e;x/b",
        b"/a/..%3bx/b",  # ';' encoded: an upstream that decodes first reads '..;x'
        b"/a/.%3B/b",
        b"/a//../b",  # merged to /a/../b
        b"/a/%2f/b",
        b"/a/%2F/b",
        b"/a/%5c/b",
        b"/a/%00",
        b"/a\\b",
        b"/public#/../private",
        b"/private#",
        b"/a?q=1#frag",
        b"http://evil.example/x",
        b"*",
    ],
)
def test_dot_segments_separators_and_fragments_are_refused(target: bytes) -> None:
    with pytest.raises(BadRequest):
        check_target(target)


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/", "/", ""),
        (b"/plain/path?x=1&y=%zz", "/plain/path", "x=1&y=%zz"),  # the query is not ours
        (b"/%61%62%63", "/abc", ""),  # unreserved decoded
        (b"/%7e%2D%5f%2e%2ex", "/~-_..x", ""),  # '..x' is a name, not a dot segment
        (b"/a%3ab", "/a%3Ab", ""),  # reserved kept, hex upper-cased
        (b"/a%20b", "/a%20b", ""),
        (b"/100%25", "/100%25", ""),  # '%25' stays '%25'
        (b"/%2541", "/%2541", ""),  # ... and does not become 'A' on a second pass
        (b"/%25%32%65", "/%252e", ""),
        (b"//a///b//", "/a/b/", ""),  # runs of '/' merged (nginx merge_slashes)
        (b"/.well-known/x", "/.well-known/x", ""),
        (b"/a/.../b", "/a/.../b", ""),
        (b"/a/..b/.c", "/a/..b/.c", ""),
        (b"/%ff", "/%FF", ""),
        (b"/a?x=;&y=%3b", "/a", "x=;&y=%3b"),  # ';' in the query is not a path parameter
    ],
)
def test_normalised_forms(target: bytes, path: str, query: str) -> None:
    for allowed in (False, True):
        assert check_target(target, allowed) == (path, query)
        assert check_target(_target(path, query), allowed) == (path, query)


PATH_PARAMETERS: Final = [
    b"/private;x/data",
    b"/private;/data",
    b"/a;x=1/b",
    b"/private/data;jsessionid=1",
    b"/private%3bfoo/x",
    b"/private%3Bfoo/x",
    b"/%70rivate%3b/x",
]


@pytest.mark.parametrize("target", PATH_PARAMETERS)
def test_path_parameters_are_refused_by_default(target: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        check_target(target)
    assert caught.value.status == 400
    assert "allow_path_parameters" in caught.value.detail


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/private;x/data", "/private;x/data"),
        (b"/a;x=1/b", "/a;x=1/b"),
        (b"/private/data;jsessionid=1", "/private/data;jsessionid=1"),
        (b"/private%3bfoo/x", "/private%3Bfoo/x"),
        (b"/%70rivate%3b/x", "/private%3B/x"),
    ],
)
def test_allowed_path_parameters_are_kept(target: bytes, path: str) -> None:
    assert check_target(target, path_parameters=True) == (path, "")
    assert check_target(path.encode(), path_parameters=True) == (path, "")


@pytest.mark.parametrize(
    "target", [b"/;x/private/data", b"/private/;x/data", b"/%3Bx/private", b"/a//;x", b"/a/%3b"]
)
def test_a_segment_of_nothing_but_parameters_is_refused(target: bytes) -> None:
    # An upstream reads it as an empty segment and may merge it away
    # ('/private//data' is '/private/data' to Tomcat).
    with pytest.raises(BadRequest):
        check_target(target, path_parameters=True)


def _target(path: str, query: str) -> bytes:
    return (path + ("?" + query if query else "")).encode("ascii")


# ---- properties ---------------------------------------------------------------

# Pieces paths are made of: plain characters, hex digits, the characters
# that matter (%, ., /, ;, \, ?, #) and escapes of all sorts, so that the
# generator often builds escapes out of pieces ('%' + '2' + 'e').
PIECES: Final = [
    *"aZ09-_~.!$&'()*+,=:@",
    *"2345ceEfF",
    "%",
    "..",
    "/",
    "//",
    ";",
    "\\",
    "?",
    "#",
    # escapes
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%25",
    "%32",
    "%33",
    "%35",
    "%45",
    "%65",
    "%66",
    "%3b",
    "%3B",
    "%5c",
    "%5C",
    "%00",
    "%41",
    "%7e",
    "%20",
    "%ff",
]
paths = st.lists(st.sampled_from(PIECES), max_size=30).map(lambda p: ("/" + "".join(p)).encode())
_VALID_ESCAPES = re.compile(rb"%[0-9A-Fa-f]{2}")


def _dot(segment: bytes) -> bool:
    return segment.split(b";", 1)[0] in (b".", b"..")


def _assert_safe(path: str) -> None:
    raw = path.encode("ascii")
    assert raw.startswith(b"/")
    assert b"//" not in raw
    assert b"\\" not in raw and b"\x00" not in raw and b"#" not in raw
    # Every '%' starts an upper-case escape of a byte that is kept encoded.
    assert raw.count(b"%") == len(re.findall(rb"%[0-9A-F]{2}", raw))
    for escape in re.findall(rb"%([0-9A-F]{2})", raw):
        byte = int(escape, 16)
        assert byte not in UNRESERVED and byte not in (0x2F, 0x5C, 0x00), escape
    for segment in raw.split(b"/"):
        assert not _dot(segment.split(b"%3B", 1)[0]), raw
    # What an upstream reads after its one decode: no new '/', no dot segment.
    decoded = unquote_to_bytes(raw)
    assert decoded.count(b"/") == raw.count(b"/")
    assert not any(_dot(s) for s in decoded.split(b"/")), decoded


@settings(max_examples=1500, deadline=None)
@given(paths, st.booleans())
@example(b"/public/%%32%65%%32%65/private/data.txt", False)
@example(b"/public/%%32%66x", False)
@example(b"/%25%32%65", False)
@example(b"/a//;x", True)
@example(b"/a%3b%3B;/b", True)
def test_normalisation_is_a_fixed_point_and_safe(target: bytes, parameters: bool) -> None:
    try:
        path, query = check_target(target, parameters)
    except BadRequest:
        return
    assert check_target(_target(path, query), parameters) == (path, query)
    _assert_safe(path)
    if parameters:
        # Every segment has something before its parameters: the router
        # matches that, and the upstream reads no empty segment.
        assert "/;" not in path and "/%3B" not in path
    else:
        assert ";" not in path and "%3B" not in path
    # Normalising changes the spelling, never what one decode reads (bar
    # merged slashes).
    original = target.partition(b"?")[0].partition(b"#")[0]
    assert re.sub(rb"//+", b"/", unquote_to_bytes(original)) == unquote_to_bytes(path)


@settings(max_examples=500, deadline=None)
@given(paths, st.booleans())
def test_a_stray_percent_is_always_refused(target: bytes, parameters: bool) -> None:
    path = target.partition(b"?")[0]
    if path.count(b"%") == len(_VALID_ESCAPES.findall(path)):
        return
    with pytest.raises(BadRequest):
        check_target(target, parameters)


# ---- the router, with path parameters allowed -------------------------------------


def _router() -> Router:
    return Router.compile(
        [
            RouteConfig(name="private", path="/private/{rest:path}", upstream="u"),
            RouteConfig(name="item", path="/items/{id:int}.{ext}", upstream="u"),
            RouteConfig(name="exact", path="/a/b", upstream="u"),
            RouteConfig(name="root", path="/{rest:path}", upstream="u"),
        ],
        {},
    )


@pytest.mark.parametrize(
    ("path", "name", "params"),
    [
        ("/private;x/data", "private", {"rest": "data"}),
        ("/private%3Bfoo/x;y", "private", {"rest": "x"}),
        ("/private%3bfoo/x", "private", {"rest": "x"}),
        ("/items/7.json;v=2", "item", {"id": "7", "ext": "json"}),
        ("/a;x/b;y", "exact", {}),
        ("/privat;e/data", "root", {"rest": "privat/data"}),
    ],
)
def test_segments_are_routed_without_their_parameters(
    path: str, name: str, params: dict[str, str]
) -> None:
    match = _router().match("GET", path)
    assert (match.route.name, match.params) == (name, params)
    assert match.path == path  # forwarded as it came


def test_a_route_path_with_a_parameter_is_a_load_error() -> None:
    for template in ("/a;v=1/b", "/a/{x}%3Bb", "/a/%3bb"):
        with pytest.raises(ConfigError) as caught:
            Router.compile([RouteConfig(name="r", path=template, upstream="u")], {})
        assert "can never match" in str(caught.value.lines()), template
    # A ';' inside a route regex is the regex's business.
    Router.compile([RouteConfig(name="r", path="/a/{x:re:[a-z;]+}", upstream="u")], {})


def test_the_documented_guard_for_case_insensitive_upstreams() -> None:
    """docs/configuration.md: a case-insensitive regex segment with the
    protected route's plugins takes every spelling before the catch-all."""
    router = Router.compile(
        [
            RouteConfig(name="private", path="/private/{rest:path}", upstream="u"),
            RouteConfig(name="PRIVATE", path="/{area:re:(?i)private}/{rest:path}", upstream="u"),
            RouteConfig(name="root", path="/{rest:path}", upstream="u"),
        ],
        {},
    )
    assert router.match("GET", "/private/data").route.name == "private"
    for path in ("/PRIVATE/data", "/PrIvAtE/a/b"):
        assert router.match("GET", path).route.name == "PRIVATE"
    assert router.match("GET", "/privates/data").route.name == "root"


# ---- through the real front doors ----------------------------------------------

ROUTES: Final[list[dict[str, Any]]] = [
    {"name": "public", "path": "/public/{rest:path}", "upstream": "test"},
    {
        "name": "private",
        "path": "/private/{rest:path}",
        "upstream": "test",
        "plugins": {"key-auth": {}},
    },
    {"name": "root", "path": "/{rest:path}", "upstream": "test"},
]


@asynccontextmanager
async def gateway(tmp_path: Path, door: str, **server: Any) -> AsyncIterator[Harness]:
    async with open_harness(
        tmp_path,
        upstream=FakeUpstream(),
        routes=ROUTES,
        server={"proxy_server": door, **server},
    ) as h:
        yield h


async def raw_get(
    h: Harness, target: bytes, key: str | None = None
) -> tuple[int, dict[str, Any] | None]:
    """Send ``target`` byte for byte (httpx would re-encode it); the status
    and the problem+json body, if any."""
    port = urlsplit(h.info.proxy_url).port
    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = bytearray()
    extra = b"" if key is None else b"X-API-Key: " + key.encode() + b"\r\n"
    async with stream:
        await stream.send_all(
            b"GET "
            + target
            + b" HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n"
            + extra
            + b"\r\n"
        )
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(bytes(data))
    conn.receive_data(b"")
    status = 0
    body = bytearray()
    ctype = ""
    for _ in range(1000):  # bounded: a response is a handful of events
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            ctype = dict(event.headers).get(b"content-type", b"").decode()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    assert status, f"no response: {bytes(data[:300])!r}"
    return status, json.loads(body) if ctype.startswith("application/problem+json") else None


@pytest.mark.parametrize("door", ["native", "hypercorn"])
async def test_double_encoded_paths_are_refused_and_never_forwarded(
    tmp_path: Path, door: str
) -> None:
    async with gateway(tmp_path, door) as h:
        # The protected area is protected, so the attacks below are bypasses.
        status, problem = await raw_get(h, b"/private/data.txt")
        assert status == 401, problem
        for target in [
            b"/public/%%32%65%%32%65/private/data.txt",
            b"/public/%%32%66..%%32%66private/data.txt",
            b"/public/%2e%2e/private/data.txt",
            b"/public/..%3b/private/data.txt",
            b"/public/%2%65%2%65/private/data.txt",
            b"/private#/../public/x",
        ]:
            status, problem = await raw_get(h, target)
            assert status == 400, (target, status, problem)
            assert problem is not None and problem["code"] == "BAD_REQUEST", problem
        # '//private' is '/private' (merged), not the unprotected root route.
        status, _ = await raw_get(h, b"//private//data.txt")
        assert status == 401
        await trio.sleep(0.1)  # anything on its way upstream would be there now
        assert h.upstream.requests == [], [r.target for r in h.upstream.requests]

        # What is accepted reaches the upstream as it was routed.
        status, _ = await raw_get(h, b"/public/%61%2541/x%3a")
        assert status == 200
        assert [r.target for r in h.upstream.requests] == ["/public/a%2541/x%3A"]


@pytest.mark.parametrize("door", ["native", "hypercorn"])
async def test_path_parameters_cannot_reach_a_protected_path_through_the_catch_all(
    tmp_path: Path, door: str
) -> None:
    """``/private;x/data`` is ``/private/data`` to Tomcat and Jetty: by
    default a 400 that never reaches the upstream."""
    async with gateway(tmp_path, door) as h:
        for target in PATH_PARAMETERS:
            status, problem = await raw_get(h, target)
            assert status == 400, (target, status, problem)
            assert problem is not None and problem["code"] == "BAD_REQUEST", problem
        assert h.upstream.requests == [], [r.target for r in h.upstream.requests]


@pytest.mark.parametrize("door", ["native", "hypercorn"])
async def test_allowed_path_parameters_are_routed_without_them(tmp_path: Path, door: str) -> None:
    """With ``allow_path_parameters`` the route is chosen by the segments
    without their parameters (what a servlet container serves), and the
    upstream gets the path as it came."""
    async with gateway(tmp_path, door, allow_path_parameters=True) as h:
        for target in [b"/private;x/data", b"/private%3bfoo/x", b"/private;/data;y"]:
            status, problem = await raw_get(h, target)
            assert status == 401, (target, status, problem)  # the protected route
        for target in [b"/;x/private/data", b"/private/;x/data", b"/%3Bx/private/data"]:
            status, problem = await raw_get(h, target)
            assert status == 400, (target, status, problem)
        assert h.upstream.requests == [], [r.target for r in h.upstream.requests]
        key = await h.create_key()
        assert (await raw_get(h, b"/private;x/data", key))[0] == 200
        assert (await raw_get(h, b"/private%3bfoo/x", key))[0] == 200
        assert (await raw_get(h, b"/public;jsessionid=1/a;b", key))[0] == 200
        assert [r.target for r in h.upstream.requests] == [
            "/private;x/data",
            "/private%3Bfoo/x",
            "/public;jsessionid=1/a;b",
        ]
