"""Regular expressions from the config (``{name:re:REGEX}`` route params),
compiled with RE2.

Python's ``re`` backtracks: ``(a+)+b`` against a 26-character segment of
``a`` takes seconds, and the router runs on the one trio thread that serves
both listeners, so one request would freeze the gateway. RE2 (Google's
engine, the one Envoy requires for routes) matches in time linear in the
segment whatever the pattern, at the price of its syntax: no backreferences
and no lookaround (such a pattern is a config error), and ``\\d``, ``\\w``,
``\\s`` are ASCII. The router's own patterns (``int``, ``uuid``, literal text)
stay on ``re``: they are fixed and cheaper there.
"""

from __future__ import annotations

from typing import Any, Protocol

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

__all__ = ["Matched", "Pattern", "RegexError", "compile_linear"]

_OPTIONS = re2.Options()
# A bad pattern is reported to the operator as a config error; RE2's own
# stderr log line would only repeat it out of context.
_OPTIONS.log_errors = False


class RegexError(ValueError):
    """The pattern is not valid RE2 syntax (``str(exc)`` says why)."""


class Matched(Protocol):
    def group(self, index: int, /) -> str | Any: ...
    def groups(self) -> tuple[str | Any, ...]: ...


class Pattern(Protocol):
    """What the router needs of a compiled pattern: ``re.Pattern`` and RE2's
    both provide it."""

    @property
    def groups(self) -> int: ...
    def fullmatch(self, text: str, /) -> Matched | None: ...


def compile_linear(source: str) -> Pattern:
    """``source`` compiled by RE2, or ``RegexError``."""
    try:
        compiled: Pattern = re2.compile(source, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(str(reason)) from None
    return compiled
