"""``triogate check-config``: every error of a config file in one pass.

A typed decode stops at its type errors: with one wrong field there is no
``Config`` to check routes, upstream references and plugin settings on, so
an operator would fix one batch, run again and meet the next. Here a field
that fails to decode is set aside (removed from a copy of the document, as if
it were not written) and the decode is tried again, so the checks across
sections and the plugins' own settings still run on everything else. An
error caused only by setting a field aside (a required field now missing) is
not reported: its cause already is.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from triogate.config import Config, cross_checks, decode_config
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_loader import discover
from triogate.errors import ConfigError, FieldError, ValidationError
from triogate.plugins.contract import PluginEnv

__all__ = ["check_document"]

# Each round sets aside at least one field; a document has far fewer rounds.
MAX_ROUNDS = 20
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _tokens(path: str) -> list[str | int] | None:
    """``routes[2].plugins.key-auth`` as ``["routes", 2, "plugins", "key-auth"]``;
    None when the path is not a field's (``$``)."""
    if not path or path == "$":
        return None
    out: list[str | int] = []
    for name, index in _TOKEN.findall(path):
        out.append(int(index) if index else name)
    return out or None


def _set_aside(doc: dict[str, Any], path: str) -> bool:
    """Remove the field at ``path`` from ``doc``; False if it is not there."""
    tokens = _tokens(path)
    if tokens is None:
        return False
    node: Any = doc
    for token in tokens[:-1]:
        if isinstance(token, int):
            if not isinstance(node, list) or token >= len(node):
                return False
        elif not isinstance(node, dict) or token not in node:
            return False
        node = node[token]
    last = tokens[-1]
    if isinstance(last, int):
        if isinstance(node, list) and last < len(node):
            del node[last]
            return True
        return False
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    return False


def _set_aside_nearest(doc: dict[str, Any], path: str) -> str | None:
    """Set aside the field at ``path``, or, when it is not there (a required
    field missing), the nearest entry containing it; the path removed."""
    tokens = _tokens(path)
    while tokens:
        candidate = _path_of(tokens)
        if _set_aside(doc, candidate):
            return candidate
        tokens = tokens[:-1]
    return None


def _path_of(tokens: list[str | int]) -> str:
    out = ""
    for t in tokens:
        out += f"[{t}]" if isinstance(t, int) else (f".{t}" if out else t)
    return out


def _caused_by(error: FieldError, set_aside: list[str]) -> bool:
    """An error on a field set aside or on what contains it."""
    return any(
        p == error.path or p.startswith((error.path + ".", error.path + "[")) or error.path == "$"
        for p in set_aside
    )


class _Removed:
    """List items set aside, by their list's path and index *in the file*:
    deleting ``routes[0]`` shifts ``routes[3]`` to ``routes[2]``, and the
    errors found afterwards must still name the file's ``routes[3]``."""

    def __init__(self) -> None:
        self.items: dict[tuple[str | int, ...], list[int]] = {}

    def original(self, path: str) -> str:
        """``path`` (in the document as it is now) as the file's path."""
        tokens = _tokens(path)
        if tokens is None:
            return path
        out: list[str | int] = []
        for token in tokens:
            if isinstance(token, int):
                for gone in sorted(self.items.get(tuple(out), ())):
                    if gone <= token:
                        token += 1
            out.append(token)
        return _path_of(out)

    def note(self, original_path: str) -> None:
        tokens = _tokens(original_path)
        if tokens and isinstance(tokens[-1], int):
            self.items.setdefault(tuple(tokens[:-1]), []).append(tokens[-1])


def _decode_all(
    doc: dict[str, Any], environ: Mapping[str, str] | None
) -> tuple[Config | None, list[FieldError], list[str], _Removed]:
    errors: list[FieldError] = []
    work = copy.deepcopy(doc)
    set_aside: list[str] = []  # paths in the file
    removed = _Removed()
    for _ in range(MAX_ROUNDS):
        try:
            return decode_config(copy.deepcopy(work), environ), errors, set_aside, removed
        except ValidationError as exc:
            found = [FieldError(removed.original(e.path), e.message) for e in exc.errors]
            fresh = [e for e in found if not _caused_by(e, set_aside) and e not in errors]
            errors.extend(fresh)
            # Deepest paths and highest list items first: removing one does
            # not move the others (within this round).
            paths = sorted({e.path for e in exc.errors}, key=_sort_key, reverse=True)
            taken = [(r, removed.original(r)) for r in _set_aside_each(work, paths)]
            if not taken:
                return None, errors, set_aside, removed
            for _current, original in taken:
                removed.note(original)
                set_aside.append(original)
    return None, errors, set_aside, removed


def _set_aside_each(work: dict[str, Any], paths: list[str]) -> list[str]:
    return [r for r in (_set_aside_nearest(work, p) for p in paths) if r]


def _sort_key(path: str) -> tuple[tuple[int, int | str], ...]:
    tokens = _tokens(path) or []
    return tuple((0, t) if isinstance(t, int) else (1, t) for t in tokens)


def check_document(
    doc: dict[str, Any], source: str, *, environ: Mapping[str, str] | None = None
) -> Config:
    """The config, or ``ConfigError`` with every error found: the typed
    decode's, the checks across sections, the routes' and the plugins'
    settings (compiled exactly as ``serve`` would; nothing opened or bound)."""
    config, errors, set_aside, removed = _decode_all(doc, environ)
    if config is not None:
        gone = {p.removeprefix("upstreams.") for p in set_aside if p.count(".") == 1}
        checked = [FieldError(removed.original(e.path), e.message) for e in cross_checks(config)]
        errors.extend(
            e
            for e in checked
            if e not in errors and not any(f"unknown upstream {u!r}" == e.message for u in gone)
        )
        try:
            env = PluginEnv(keyspaces=frozenset(config.keyspace_prefixes))
            Pipeline.build(config, discover(), env).close()
        except ConfigError as exc:
            built = [FieldError(removed.original(e.path), e.message) for e in exc.errors]
            errors.extend(e for e in built if e not in errors)
        except (KeyError, LookupError):
            # A route naming an unknown upstream: cross_checks said so.
            if not errors:
                raise
    if errors:
        raise ConfigError(errors, source)
    assert config is not None
    return config
