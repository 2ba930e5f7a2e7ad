"""Reason phrases on hypercorn's HTTP/1.1 answers.

hypercorn (0.18) hands h11 its responses without a reason phrase, so the
admin listener (and the hypercorn proxy front door) answer ``HTTP/1.1 200 ``.
RFC 9112 lets clients ignore the phrase, but HTTP checkers (REDbot) and some
clients read "None". hypercorn offers no setting and picks its protocol
classes itself, so this wraps the one method every h11 answer goes through,
once per process, and fills in the standard phrase when none is given.
``tests/test_admin_conformance.py`` reads the status line of a real answer,
so a hypercorn release that moves this method fails CI instead of silently
dropping the phrase again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

import h11
from hypercorn.protocol.h11 import H11Protocol

__all__ = ["install_reason_phrases"]

_PHRASES: Final = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_MARK: Final = "_triogate_reason_phrases"


def with_reason(event: Any) -> Any:
    """``event`` with the standard reason phrase when it is an answer that
    has none; anything else unchanged."""
    if isinstance(event, h11.Response | h11.InformationalResponse) and not event.reason:
        phrase = _PHRASES.get(event.status_code)
        if phrase is not None:
            return type(event)(
                status_code=event.status_code,
                headers=event.headers,
                http_version=event.http_version,
                reason=phrase,
            )
    return event


def install_reason_phrases() -> None:
    """Wrap ``H11Protocol._send_h11_event`` (idempotent)."""
    original: Callable[[Any, Any], Awaitable[None]] = H11Protocol._send_h11_event
    if getattr(original, _MARK, False):
        return

    async def send(self: Any, event: Any) -> None:
        await original(self, with_reason(event))

    setattr(send, _MARK, True)
    H11Protocol._send_h11_event = send  # type: ignore[method-assign]
