"""Shared by the doc-coverage tests: reading a documented default out of a
Markdown table cell and comparing it with a msgspec field's real default."""

from __future__ import annotations

import re
import tomllib
from typing import Any

import msgspec

__all__ = ["REQUIRED", "documented_default", "real_default", "same_default"]

REQUIRED = object()


def real_default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return REQUIRED


def documented_default(cell: str) -> Any:
    if cell == "none":
        return None
    if cell == "required":
        return REQUIRED
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m is not None, f"a default is a TOML value in backticks, none or required: {cell!r}"
    try:
        return tomllib.loads(f"v = {m.group(1)}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise AssertionError(f"the default {cell} is not a TOML value: {exc}") from None


def same_default(documented: Any, real: Any) -> bool:
    if documented is REQUIRED or real is REQUIRED or documented is None or real is None:
        return documented is real
    if isinstance(real, msgspec.Struct):  # a table: `{}` when all of it is default
        return documented == {} and real == type(real)()
    if isinstance(documented, bool) or isinstance(real, bool):
        return type(documented) is type(real) and documented == real
    if isinstance(real, list | tuple):
        return (
            isinstance(documented, list)
            and len(documented) == len(real)
            and all(same_default(d, r) for d, r in zip(documented, real, strict=True))
        )
    if isinstance(real, dict):
        return isinstance(documented, dict) and documented == real
    if isinstance(real, float):  # `10` for a float field is the same value
        return isinstance(documented, int | float) and float(documented) == real
    return type(documented) is type(real) and documented == real
