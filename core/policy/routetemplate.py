"""Route templates, parsed once per config: ``/users/{id:int}`` into typed
segments (static text, a whole-segment param, literal text around params, a
trailing ``{p:path}``), ``upstream_path`` into a rewrite template, and the
ordering and headers of API versions. The router (``router``) builds its
trie from these; its docstring is the theory of operation.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import format_datetime
from typing import Final

from triogate.config import ApiVersionConfig
from triogate.policy.userregex import Pattern, RegexError, compile_linear

__all__ = [
    "MAX_SEGMENTS",
    "MIXED",
    "NO_HEADERS",
    "PARAM",
    "PATH",
    "STATIC",
    "Headers",
    "Param",
    "ParamType",
    "Segment",
    "canonical_int",
    "compare_versions",
    "deprecation_headers_for",
    "parse_path",
    "rewrite_template",
    "version_key",
]

MAX_SEGMENTS: Final = 128  # keeps the recursive walk far from Python's recursion limit

Headers = tuple[tuple[str, str], ...]
NO_HEADERS: Final[Headers] = ()


# --- parameter types -------------------------------------------------------


def _is_int(text: str) -> bool:
    digits = text[1:] if text[:1] == "-" else text
    # isdigit() alone accepts '²' and other non-ASCII digits.
    return digits.isascii() and digits.isdigit()


_UUID: Final = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


@dataclass(frozen=True, slots=True)
class ParamType:
    key: str  # part of the shape: "int", "uuid", "str", "path" or "re:<regex>"
    pattern: str  # regex for this param inside a mixed segment
    check: Callable[[str], object] | None  # None: any non-empty segment
    rank: int  # precedence among whole-segment params at one node
    expected: str  # completes "path parameter 'id' must ..."
    inner_groups: int = 0  # capturing groups inside a user regex


PARAM_TYPES: Final[dict[str, ParamType]] = {
    "int": ParamType("int", r"-?[0-9]+", _is_int, 0, "be an int"),
    "uuid": ParamType("uuid", _UUID, re.compile(_UUID).fullmatch, 1, "be a UUID"),
    "str": ParamType("str", r"[^/]+?", None, 2, "be a non-empty segment"),
    "path": ParamType("path", "", None, 4, "be a non-empty path"),
}
_REGEX_RANK: Final = 3
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _regex_type(source: str) -> ParamType:
    # RE2, not re: linear time whatever the pattern (see userregex.py).
    compiled = compile_linear(source)  # RegexError is reported by the caller
    return ParamType(
        "re:" + source,
        f"(?:{source})",
        compiled.fullmatch,
        _REGEX_RANK,
        f"match the pattern {source!r}",
        compiled.groups,
    )


# --- templates ---------------------------------------------------------------

STATIC, PARAM, MIXED, PATH = range(4)


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: ParamType


@dataclass(frozen=True, slots=True)
class Segment:
    kind: int
    text: str
    params: tuple[Param, ...] = ()
    key: Hashable = None  # equal keys <=> same shape at this level
    pattern: Pattern | None = None  # mixed: params typed (RE2)
    shape: Pattern | None = None  # mixed: every param is "any text" (RE2)
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


def _parse_param(spec: str, errors: list[str]) -> Param | None:
    name, _, type_spec = spec.partition(":")
    if not _NAME_RE.fullmatch(name):
        errors.append(f"invalid parameter name {name!r}")
        return None
    if not type_spec:
        return Param(name, PARAM_TYPES["str"])
    if type_spec.startswith("re:"):
        source = type_spec[3:]
        if not source:
            errors.append(f"invalid regex for parameter {name!r}: empty")
            return None
        try:
            return Param(name, _regex_type(source))
        except RegexError as exc:
            errors.append(f"invalid regex {source!r}: {exc} (RE2 syntax)")
            return None
    ptype = PARAM_TYPES.get(type_spec)
    if ptype is None:
        errors.append(f"unknown parameter type {type_spec!r}")
        return None
    return Param(name, ptype)


def _mixed_segment(text: str, parts: list[str | Param], errors: list[str]) -> Segment | None:
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
    # RE2 for both (linear time): with ``re``, ``{a}-{b}.json`` against a
    # segment of 30,000 '-' tries every split of the run (userregex.py).
    try:
        pattern = compile_linear("".join(typed))
        shape_pattern = compile_linear("".join(shape))
    except RegexError as exc:
        errors.append(f"invalid regex in segment {text!r}: {exc}")
        return None
    params = tuple(p for p in parts if isinstance(p, Param))
    return Segment(
        MIXED,
        text,
        params,
        ("mixed", *key),
        pattern,
        shape_pattern,
        None if pattern.groups == len(params) else tuple(groups),
        sum(len(p) for p in parts if isinstance(p, str)),
    )


def parse_path(template: str) -> tuple[list[Segment], list[str]]:
    """The segments of a route path, or the problems with it (without prefix)."""
    errors: list[str] = []
    raw_segments = _split_template(template, errors)
    if len(raw_segments) > MAX_SEGMENTS:
        errors.append(f"more than {MAX_SEGMENTS} segments")
    segments: list[Segment] = []
    seen: set[str] = set()
    last = len(raw_segments) - 1
    for index, raw in enumerate(raw_segments):
        text = "".join(p if isinstance(p, str) else "{" + p[0] + "}" for p in raw)
        parts: list[str | Param] = []
        for item in raw:
            if isinstance(item, str):
                if ";" in item or "%3b" in item.lower():
                    # Requests' path parameters are refused, or removed
                    # before routing (server.allow_path_parameters).
                    errors.append(f"a ';' (or '%3B') in segment {text!r} can never match")
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
        if not any(isinstance(p, Param) for p in parts):
            segments.append(Segment(STATIC, text, key=("static", text)))
        elif len(parts) == 1 and isinstance(parts[0], Param):
            param = parts[0]
            kind = PATH if param.type.key == "path" else PARAM
            segments.append(Segment(kind, text, (param,), (param.type.key,)))
        else:
            segment = _mixed_segment(text, parts, errors)
            if segment is not None:
                segments.append(segment)
    return segments, errors


def rewrite_template(template: str, names: Sequence[str] | None, errors: list[str]) -> str | None:
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


def compare_versions(a: str, b: str) -> int:
    if a.isascii() and a.isdigit() and b.isascii() and b.isdigit():
        x, y = int(a), int(b)
        return (x > y) - (x < y)
    return (a > b) - (a < b)


version_key: Final = functools.cmp_to_key(compare_versions)


def canonical_int(text: str) -> str:
    """``v01`` and ``v1`` are the same version (string ops: int() of a huge
    path segment would raise past Python's digit limit)."""
    negative = text.startswith("-")
    digits = (text[1:] if negative else text).lstrip("0") or "0"
    return "-" + digits if negative and digits != "0" else digits


def deprecation_headers_for(config: ApiVersionConfig) -> Headers:
    headers: list[tuple[str, str]] = []
    if config.deprecated:
        headers.append(("Deprecation", "true"))
    if config.sunset is not None:
        # RFC 9110 IMF-fixdate, e.g. "Wed, 30 Jun 2027 00:00:00 GMT".
        headers.append(("Sunset", format_datetime(config.sunset.astimezone(UTC), usegmt=True)))
    return tuple(headers)
