"""Route regexes (``{x:re:...}``) and the router's own patterns for mixed
segments (``{a}-{b}.json``) run on RE2: no pattern can make matching a
crafted segment take more than linear time (ReDoS), ordinary patterns load
and match as before (the same groups as Python's ``re``), and what RE2
cannot do is a load error.

Python's ``re`` needs seconds for ``(a+)+b`` against 26 ``a`` and a ``c``, and
longer than the universe for the 5,000-character segments used here; a
regression would therefore hang, so the matching runs in child processes that
are killed after a generous bound (not a timing assertion: either the answer
comes or the test fails).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.helpers_process import clean_env, serving, write_config
from tests.test_router import build, compile_errors, rc
from triogate.errors import InvalidPathParameter, RouteNotFound
from triogate.policy.routetemplate import MIXED, parse_path
from triogate.policy.userregex import LinearPattern

# Catastrophic for a backtracking engine: nested quantifiers, overlapping
# alternation under a quantifier, quantified groups that can match the same
# text in many ways.
EVIL = [
    "(a+)+b",
    "(a*)*b",
    "(a|a)+b",
    "(a|aa)+b",
    "(a|ab)*c",
    "([a-z]+)*[0-9]",
    "(?:a+){2,}b",
    "(.*a){12}",
    "(\\w+\\d*)+z",
]
EVIL_SEGMENT = "a" * 5000 + "!"
BOUND_SECONDS = 120  # a generous cap on a child; the work itself is milliseconds


def _run_child(code: str) -> str:
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=BOUND_SECONDS,
            env=clean_env(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("matching a route regex did not finish: backtracking (ReDoS)")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_evil_patterns_load_and_match_in_linear_time() -> None:
    code = f"""
from triogate.config import RouteConfig
from triogate.errors import InvalidPathParameter
from triogate.policy.router import Router
evil = {EVIL!r}
routes = [RouteConfig(name=f"r{{i}}", path=f"/r{{i}}/{{{{v:re:{{p}}}}}}", upstream="u")
          for i, p in enumerate(evil)]
# A mixed segment (literal text around the regex) goes through RE2 too.
routes.append(RouteConfig(name="mixed", path="/m/x{{v:re:(a+)+b}}.json", upstream="u"))
router = Router.compile(routes, {{}})
segment = {EVIL_SEGMENT!r}
for i in range(len(evil)):
    try:
        router.match("GET", f"/r{{i}}/{{segment}}")
    except InvalidPathParameter:
        print("refused", i)
try:
    router.match("GET", f"/m/x{{segment}}.json")
except Exception as exc:
    print("mixed", type(exc).__name__)
print("matched", router.match("GET", "/r0/aaab").params)
"""
    out = _run_child(code).splitlines()
    assert out == [
        *(f"refused {i}" for i in range(len(EVIL))),
        "mixed InvalidPathParameter",
        "matched {'v': 'aaab'}",
    ]


# The router's own pattern for ``{a}-{b}-{c}-{d}.json`` is
# ``([^/]+?)\\-([^/]+?)\\-([^/]+?)\\-([^/]+?)\\.json``: Python's ``re`` tries
# every split of a run of '-' (n**4 of them: a second at n = 200, longer
# than anyone waits at 30,000); two params take ~10 s at 30,000.
MIXED_ROUTES = ("/f/{a}-{b}.json", "/f/{a}-{b}-{c}-{d}.json")
DASHES = "-" * 30_000 + "x"


def test_mixed_segments_match_in_linear_time() -> None:
    code = f"""
from triogate.config import RouteConfig
from triogate.errors import RouteNotFound
from triogate.policy.router import Router
routes = [RouteConfig(name=p, path=p, upstream="u") for p in {MIXED_ROUTES!r}]
router = Router.compile(routes, {{}})
for path in ("/f/" + {DASHES!r}, "/f/" + {DASHES!r} + ".jso", "/f/x" + {DASHES!r} + "json"):
    try:
        router.match("GET", path)
    except RouteNotFound:
        print("404")
print(router.match("GET", "/f/" + {DASHES!r} + ".json").route.name)
"""
    out = _run_child(code).splitlines()
    assert out == ["404", "404", "404", "/f/{a}-{b}-{c}-{d}.json"]


def test_mixed_segments_are_compiled_by_re2() -> None:
    for template in (*MIXED_ROUTES, "/v{version:int}", "/x/{id:uuid}.{ext}", "/m/a{s:re:b+}c"):
        segments, errors = parse_path(template)
        assert errors == []
        for segment in segments:
            if segment.kind == MIXED:
                assert isinstance(segment.pattern, LinearPattern)
                assert isinstance(segment.shape, LinearPattern)


def test_mixed_segments_still_split_as_before() -> None:
    router = build(*(rc(p, name=p) for p in MIXED_ROUTES), rc("/n/{a:int}.{b}", name="int"))
    assert router.match("GET", "/f/x-y.json").params == {"a": "x", "b": "y"}
    # Leftmost params take as little as they can (lazy), as with ``re``.
    assert router.match("GET", "/f/x-y-z.json").params == {"a": "x", "b": "y-z"}
    assert router.match("GET", "/f/a-b-c-d-e.json").params == {
        "a": "a",
        "b": "b",
        "c": "c",
        "d": "d-e",
    }
    assert router.match("GET", "/f/---.json").params == {"a": "-", "b": "-"}
    assert router.match("GET", "/n/-12.tar.gz").params == {"a": "-12", "b": "tar.gz"}
    with pytest.raises(InvalidPathParameter):
        router.match("GET", "/n/x.json")  # the shape fits, the int does not
    with pytest.raises(RouteNotFound):
        router.match("GET", "/f/x.json")


# Mixed segments as templates: literal text and params of each type.
_PART = st.sampled_from(["-", ".", "v", ".json", "_", "~", "a-", "%20", "{}", "{:int}", "{:uuid}"])
_TEXT = st.text(alphabet="-._~v0123456789abcdefjsonx%2é", max_size=14)
_UUID = "123e4567-e89b-12d3-a456-426614174000"


@settings(max_examples=400, deadline=None)
@given(st.lists(_PART, min_size=2, max_size=5), _TEXT, _TEXT)
@example(["{}", "-", "{}", ".json"], "x-y-z", ".json")
@example(["{:uuid}", ".", "{}"], _UUID + ".a.b", "")
@example(["{:int}", "{}"], "-1-2", "")
def test_re2_groups_are_re_groups(parts: list[str], head: str, tail: str) -> None:
    """What the RE2 patterns capture is what ``re`` captured before."""
    names = iter(f"p{i}" for i in range(len(parts)))
    template = "/" + "".join(p.replace("{", "{" + next(names)) if "{" in p else p for p in parts)
    segments, errors = parse_path(template)
    assert errors == []
    [segment] = segments
    if segment.kind != MIXED:
        return  # one param alone, or no param: not a mixed segment
    text = head + tail
    assert segment.pattern is not None and segment.shape is not None
    for linear in (segment.pattern, segment.shape):
        assert isinstance(linear, LinearPattern)
        old = re.compile(linear.pattern).fullmatch(text)
        new = linear.fullmatch(text)
        assert (old is None) == (new is None), (linear.pattern, text)
        if old is not None and new is not None:
            assert new.groups() == old.groups(), (linear.pattern, text)
            assert [new.group(i) for i in range(old.re.groups + 1)] == [
                old.group(i) for i in range(old.re.groups + 1)
            ]


def test_ordinary_patterns_still_load_and_match() -> None:
    router = build(
        rc("/d/{day:re:[0-9]{4}-[0-9]{2}}", name="month"),
        rc("/s/{slug:re:[a-z]+}", name="slug"),
        rc("/c/{code:re:[A-Z]{3}}", name="code"),
        rc("/f/{name}.{ext:re:json|yaml}", name="file"),
        rc("/g/{g:re:(ab|cd)+}-{n:int}", name="groups"),
        rc("/i/{w:re:(?i)hello}", name="flags"),
    )
    assert router.match("GET", "/d/2026-12").params == {"day": "2026-12"}
    assert router.match("GET", "/s/abc").params == {"slug": "abc"}
    assert router.match("GET", "/c/EUR").params == {"code": "EUR"}
    assert router.match("GET", "/f/report.yaml").params == {"name": "report", "ext": "yaml"}
    assert router.match("GET", "/g/abcdab-7").params == {"g": "abcdab", "n": "7"}
    assert router.match("GET", "/i/HeLLo").params == {"w": "HeLLo"}
    # Anchored at both ends, as before.
    for path in ("/d/2026-123", "/s/abc1", "/c/EURO", "/c/eur"):
        with pytest.raises(InvalidPathParameter):
            router.match("GET", path)


@pytest.mark.parametrize(
    "pattern",
    ["(a)\\1", "(?P<x>a)(?P=x)", "a(?=b)", "(?!x)y", "(?<=a)b", "(?<!a)b", "[a-z"],
)
def test_what_re2_cannot_do_is_a_load_error(
    pattern: str, capfd: pytest.CaptureFixture[str]
) -> None:
    [message] = compile_errors(rc(f"/x/{{v:re:{pattern}}}"))
    assert message.startswith(f"routes[0].path: invalid regex {pattern!r}: "), message
    assert message.endswith("(RE2 syntax)"), message
    # The error is said once, in the config error; RE2 logs nothing itself.
    captured = capfd.readouterr()
    assert "re2" not in captured.err.lower(), captured.err


def test_the_gateway_keeps_answering_an_evil_path(tmp_path: Path) -> None:
    """The real server: a crafted segment against ``(a+)+b`` is a prompt 400,
    and both listeners keep answering."""
    config = write_config(tmp_path / "c.toml", tmp_path / "data")
    with config.open("a") as f:
        f.write(
            '[upstreams.u]\ntargets = ["http://127.0.0.1:9"]\n'
            '[[routes]]\nname = "evil"\npath = "/r/{v:re:(a+)+b}"\nupstream = "u"\n'
            '[[routes]]\nname = "mixed"\npath = "/f/{a}-{b}-{c}-{d}.json"\nupstream = "u"\n'
        )
    with serving(config) as serve:
        admin = serve.url
        proxy = next(
            line.rsplit(" ", 1)[1]
            for line in serve.stdout_lines
            if line.startswith("triogate: proxy listening on ")
        )
        timeout = httpx.Timeout(BOUND_SECONDS)
        r = httpx.get(f"{proxy}/r/{'a' * 26}c", timeout=timeout)
        assert (r.status_code, r.json()["code"]) == (400, "INVALID_PATH_PARAMETER")
        r = httpx.get(f"{proxy}/r/{EVIL_SEGMENT[:-1]}c", timeout=timeout)
        assert (r.status_code, r.json()["code"]) == (400, "INVALID_PATH_PARAMETER")
        r = httpx.get(f"{proxy}/f/{DASHES}", timeout=timeout)
        assert (r.status_code, r.json()["code"]) == (404, "ROUTE_NOT_FOUND")
        assert httpx.get(f"{admin}/health", timeout=timeout).status_code == 200
        # A matching segment reaches the (absent) upstream: 502, not 400.
        assert httpx.get(f"{proxy}/r/aaab", timeout=timeout).status_code in (502, 503, 504)
        assert serve.stop() == 0
