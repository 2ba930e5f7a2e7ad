"""Regular expressions compiled with RE2: the config's (``{name:re:REGEX}``
route params) and the router's own for segments with literal text around
params (``{a}-{b}.json``).

Python's ``re`` backtracks: ``(a+)+b`` against a 26-character segment of
``a`` takes seconds, and so does the router's own ``([^/]+?)-([^/]+?)\\.json``
against 30,000 ``-`` (every split of the run is tried, ``n**k`` of them for
``k`` params); the router runs on the one trio thread that serves both
listeners, so one request would freeze the gateway. RE2 (Google's engine,
the one Envoy requires for routes) matches in time linear in the segment
whatever the pattern, with the same leftmost-first choice of groups as
``re`` (so ``{a}-{b}`` still splits ``x-y-z`` as ``x`` and ``y-z``), at the
price of its syntax: no backreferences and no lookaround (such a pattern is a
config error), and ``\\d``, ``\\w``, ``\\s`` are ASCII. Whole-segment ``int``
and ``uuid`` checks stay plain Python: they cannot backtrack.

The binding's ``fullmatch`` spends most of its time mapping UTF-8 offsets
back to ``str`` offsets; a routed path is ASCII (``check_target``), where the
two are the same, so ``LinearPattern`` calls RE2 directly for ASCII text
(about 1 µs a segment) and leaves anything else to the binding.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

__all__ = ["LinearPattern", "Matched", "Pattern", "RegexError", "compile_linear"]

_OPTIONS = re2.Options()
# A bad pattern is reported to the operator as a config error; RE2's own
# stderr log line would only repeat it out of context.
_OPTIONS.log_errors = False
_BOTH: Final = re2._re2.RE2.Anchor.ANCHOR_BOTH  # fullmatch


class RegexError(ValueError):
    """The pattern is not valid RE2 syntax (``str(exc)`` says why)."""


class Matched(Protocol):
    def group(self, index: int, /) -> str | Any: ...
    def groups(self) -> tuple[str | Any, ...]: ...


class Pattern(Protocol):
    """What the router needs of a compiled pattern: ``re.Pattern``, RE2's
    and ``LinearPattern`` provide it."""

    @property
    def groups(self) -> int: ...
    def fullmatch(self, text: str, /) -> Matched | None: ...


class _Found:
    """A match of ASCII text: groups sliced from it by RE2's offsets."""

    __slots__ = ("_spans", "_text")

    def __init__(self, text: str, spans: list[tuple[int, int]]) -> None:
        self._text = text
        self._spans = spans

    def group(self, index: int, /) -> str | None:
        start, end = self._spans[index]
        return None if start < 0 else self._text[start:end]

    def groups(self) -> tuple[str | None, ...]:
        text = self._text
        return tuple(None if a < 0 else text[a:b] for a, b in self._spans[1:])


class LinearPattern:
    """A pattern compiled by RE2 (``compile_linear``)."""

    __slots__ = ("_compiled", "_regexp", "groups", "pattern")

    def __init__(self, source: str, compiled: Any) -> None:
        self.pattern = source
        self.groups: int = compiled.groups
        self._compiled = compiled  # the binding's object: non-ASCII text
        self._regexp = compiled._regexp  # RE2 itself: ASCII text

    def fullmatch(self, text: str, /) -> Matched | None:
        if text.isascii():
            data = text.encode()
            spans = self._regexp.Match(_BOTH, data, 0, len(data))
            return None if spans[0][0] < 0 else _Found(text, spans)
        found: Matched | None = self._compiled.fullmatch(text)
        return found

    def __repr__(self) -> str:
        return f"LinearPattern({self.pattern!r})"


def compile_linear(source: str) -> LinearPattern:
    """``source`` compiled by RE2, or ``RegexError``."""
    try:
        compiled = re2.compile(source, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(str(reason)) from None
    return LinearPattern(source, compiled)
