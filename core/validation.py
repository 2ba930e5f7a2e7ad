"""Validate untrusted input against msgspec Structs, reporting *every* error.

msgspec stops at the first error, which is right for speed and wrong for a
person fixing a config or a request. ``convert_all`` walks a Struct's fields
itself: unknown fields, missing fields, and each field's value (recursing into
nested Structs and lists/dicts of Structs) are checked separately, every
failure becomes a ``FieldError`` with its full path, and only a clean input is
converted for real (which also runs ``__post_init__`` cross-field rules).
The types are the single source of truth: the same ones emit the JSON Schema
that ``/openapi.json`` publishes.
"""

from __future__ import annotations

import contextlib
import functools
import re
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union

import msgspec

from triogate.errors import FieldError, ValidationError

__all__ = ["Rule", "convert_all", "decode_json_object"]

T = TypeVar("T")

_AT_RE = re.compile(r" - at `\$(.*)`$")
_json_decoder = msgspec.json.Decoder()


class Rule:
    """A check msgspec's ``Meta`` cannot express, attached to a type with
    ``Annotated[T, Meta(...), Rule(check)]``: ``check(value)`` returns an error
    message or None. msgspec ignores it; ``convert_all`` runs it on the
    converted value and reports it at the field's own path (or at the member
    ``at`` below it, for a rule on a Struct about one of its fields), together
    with every other error."""

    __slots__ = ("at", "check")

    def __init__(self, check: Callable[[Any], str | None], *, at: str = "") -> None:
        self.check = check
        self.at = at


class _Full(Exception):
    """Enough errors collected: the rest of the input is not looked at."""


class _Errors(list[FieldError]):
    """An error list that stops the walk once it is longer than
    ``ValidationError`` would report (a megabyte of unknown fields costs one
    hundred checks, not a hundred thousand)."""

    def append(self, error: FieldError) -> None:
        super().append(error)
        if len(self) > ValidationError.MAX_ERRORS:
            raise _Full


def _rules(tp: Any) -> list[Rule]:
    found: list[Rule] = []
    if typing.get_origin(tp) is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        found.extend(m for m in meta if isinstance(m, Rule))
        found.extend(_rules(inner))
    elif typing.get_origin(tp) in (Union, types.UnionType):
        for member in typing.get_args(tp):
            found.extend(_rules(member))
    return found


def _unwrap(tp: Any) -> Any:
    """``X`` from ``Annotated[X, ...]``, ``X | None``, ``X | UnsetType``."""
    tp = _strip(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [
            a for a in typing.get_args(tp) if a is not type(None) and a is not msgspec.UnsetType
        ]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _join(path: str, suffix: str) -> str:
    if not suffix:
        return path
    if suffix.startswith("["):
        return path + suffix
    return f"{path}{suffix}" if path else suffix.lstrip(".")


# A regular expression is no answer for a person: the patterns people meet
# (config and admin API fields), said in a sentence. An unknown one stays as
# msgspec words it.
_HTTP_URL = "an http:// or https:// URL with a host, e.g. http://10.0.0.5:8080"
PATTERN_SENTENCES: dict[str, str] = {
    r"^https?://[^/\s]+(/[^\s]*)?$": _HTTP_URL,
    r"^https?://[^/\s?#]+(/[^\s#]*)?$": _HTTP_URL + " (no #fragment)",
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$": (
        "host:port, e.g. 127.0.0.1:8000, 0.0.0.0:8000 or [::]:8000"
    ),
    r"^[A-Za-z0-9_.-]+$": "letters, digits, '_', '.' and '-' only",
    r"^[A-Za-z0-9._-]{1,32}$": "1 to 32 letters, digits, '_', '.' or '-'",
    r"^[a-z][a-z0-9]{0,15}_$": (
        "a lowercase letter, up to 15 lowercase letters or digits, then '_' (e.g. tg_)"
    ),
    r"^/": "a path starting with '/'",
    r"^(redis|rediss|unix|redis\+sentinel|rediss\+sentinel)://\S+$": (
        "a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"
    ),
    r"^[^@\s]+@[^@\s]+$": "an email address (name@domain)",
    r"^[\x21-\x7e]+$": "printable ASCII without spaces",
}
_PATTERN_RE = re.compile(r"^Expected `str` matching regex '(.*)'$")


def _message(exc: msgspec.ValidationError, path: str) -> FieldError:
    text = str(exc)
    m = _AT_RE.search(text)
    if m:
        text = text[: m.start()]
        path = _join(path, m.group(1))
    p = _PATTERN_RE.match(text)
    if p:
        # msgspec doubles the backslashes of the pattern it quotes.
        sentence = PATTERN_SENTENCES.get(p.group(1).replace("\\\\", "\\"))
        if sentence is not None:
            text = f"must be {sentence}"
    return FieldError(path or "$", text)


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _struct_in(tp: Any) -> type[msgspec.Struct] | None:
    """The Struct type inside ``X``, ``X | None``."""
    tp = _strip(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [
            a for a in typing.get_args(tp) if a is not type(None) and a is not msgspec.UnsetType
        ]
        if len(members) == 1:
            return _struct_in(members[0])
    return None


def _check(tp: Any, raw: Any, path: str, errors: list[FieldError], strict: bool) -> None:
    struct = _struct_in(tp)
    if struct is not None and isinstance(raw, dict):
        before = len(errors)
        _check_struct(struct, raw, path, errors, strict)
        if len(errors) == before and _rules(tp):
            _convert_into(tp, raw, path, errors, strict)  # rules on the Struct itself
        return
    bare = _unwrap(tp)
    origin = typing.get_origin(bare)
    args = typing.get_args(bare)
    if origin in (list, tuple) and isinstance(raw, list) and args and _struct_in(args[0]):
        before = len(errors)
        for i, item in enumerate(raw):
            _check(args[0], item, f"{path}[{i}]", errors, strict)
        if len(errors) == before:
            _convert_into(tp, raw, path, errors, strict)  # constraints on the list itself
        return
    if origin is dict and isinstance(raw, dict) and len(args) == 2 and _struct_in(args[1]):
        for k, item in raw.items():
            _check(args[1], item, f"{path}.{k}" if path else str(k), errors, strict)
        return
    _convert_into(tp, raw, path, errors, strict)


def _convert_into(tp: Any, raw: Any, path: str, errors: list[FieldError], strict: bool) -> None:
    try:
        value = msgspec.convert(raw, tp, strict=strict)
    except msgspec.ValidationError as exc:
        errors.append(_message(exc, path))
        return
    if value is None or value is msgspec.UNSET:
        return
    for rule in _rules(tp):
        message = rule.check(value)
        if message is not None:
            where = _join(path, f".{rule.at}") if rule.at else path
            errors.append(FieldError(where or "$", message))


@functools.cache
def _fields_of(struct: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    # Once per Struct type (a bounded set): ``fields`` evaluates the
    # annotations every call, most of a request's validation time.
    return {f.encode_name: f for f in msgspec.structs.fields(struct)}


def _check_struct(
    struct: type[msgspec.Struct],
    raw: dict[str, Any],
    path: str,
    errors: list[FieldError],
    strict: bool,
) -> None:
    fields = _fields_of(struct)
    for name in raw:
        if name not in fields:
            errors.append(FieldError(_join(path, f".{name}"), "unknown field"))
    for name, field in fields.items():
        sub = _join(path, f".{name}")
        if name not in raw:
            if field.required:
                errors.append(FieldError(sub, "required field is missing"))
            continue
        _check(field.type, raw[name], sub, errors, strict)


def convert_all(raw: Any, tp: type[T], *, path: str = "", strict: bool = True) -> T:
    """Convert ``raw`` (decoded JSON/TOML) to ``tp`` or raise ``ValidationError``
    listing every failing field. ``strict=False`` lets strings stand for
    numbers and booleans, as in query strings."""
    errors = _Errors()
    struct = _struct_in(tp)
    if struct is not None and not isinstance(raw, dict):
        raise ValidationError(
            [FieldError(path or "$", f"expected an object, got {type(raw).__name__}")]
        )
    with contextlib.suppress(_Full):  # enough said
        _check(tp, raw, path, errors, strict)
    if errors:
        raise ValidationError(errors)
    try:
        return msgspec.convert(raw, tp, strict=strict)
    except msgspec.ValidationError as exc:
        # Cross-field rules (__post_init__) only run on the real conversion.
        raise ValidationError([_message(exc, path)]) from None


def decode_json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object."""
    if not body.strip():
        return {}
    try:
        raw = _json_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ValidationError([FieldError("$", f"invalid JSON: {exc}")]) from None
    except RecursionError:
        raise ValidationError([FieldError("$", "JSON nested too deeply")]) from None
    if not isinstance(raw, dict):
        raise ValidationError([FieldError("$", "expected a JSON object")])
    return raw
