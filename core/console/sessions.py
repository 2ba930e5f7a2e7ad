"""Console sessions, sans-IO: an opaque random id (the cookie) to the admin
who signed in, a per-session CSRF token, and an idle expiry.

The admin key itself stays in this process's memory only (never in a cookie,
a URL or a log): every console request authenticates it again exactly as the
admin API does, so a revoked admin's sessions end at their next request.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MAX_SESSIONS", "MAX_SESSIONS_PER_ADMIN", "Session", "SessionStore"]

#: Sessions kept at once; the least recently used is dropped past this, so a
#: flood of sign-ins cannot grow memory without bound.
MAX_SESSIONS = 1000
#: Sessions kept per admin: one admin signing in again and again drops its
#: own oldest sessions, never pushes every other admin's out of the store.
MAX_SESSIONS_PER_ADMIN = 20


@dataclass
class Session:
    id: str = field(repr=False)
    csrf: str = field(repr=False)
    admin_key: str = field(repr=False)
    admin_id: str
    last_seen: float
    # A new key's plaintext, shown on the next page of that key and then gone.
    reveal: tuple[str, str] | None = field(default=None, repr=False)
    # One message for the next page (after a redirect): (kind, text).
    flash: tuple[str, str] | None = None

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(sent.encode(), self.csrf.encode())

    def pop_flash(self) -> tuple[str, str] | None:
        flash, self.flash = self.flash, None
        return flash

    def pop_reveal(self, key_id: str) -> str | None:
        """The plaintext of ``key_id`` if it was just made, once."""
        if self.reveal is None or self.reveal[0] != key_id:
            return None
        plaintext = self.reveal[1]
        self.reveal = None
        return plaintext


class SessionStore:
    """Sessions by id, least recently used first. ``now`` is a monotonic
    clock; ``idle_seconds`` is read at each look-up (a reload may change it)."""

    def __init__(
        self,
        now: Callable[[], float],
        idle_seconds: Callable[[], float],
        *,
        max_sessions: int = MAX_SESSIONS,
        max_per_admin: int = MAX_SESSIONS_PER_ADMIN,
    ) -> None:
        self._now = now
        self._idle = idle_seconds
        self._max = max_sessions
        self._max_per_admin = max_per_admin
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, admin_key: str, admin_id: str) -> Session:
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            admin_key=admin_key,
            admin_id=admin_id,
            last_seen=self._now(),
        )
        own = [s.id for s in self._sessions.values() if s.admin_id == admin_id]
        for session_id in own[: max(0, len(own) - self._max_per_admin + 1)]:
            del self._sessions[session_id]  # this admin's least recently used
        self._sessions[session.id] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """The live session of this id, else None; an expired one is
        dropped. ``touch``: the admin is at work, so the idle clock restarts
        (not for a page's own polling, which would keep an unattended
        session alive forever)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._now()
        if now - session.last_seen > self._idle():
            del self._sessions[session_id]
            return None
        if touch:
            session.last_seen = now
            self._sessions.move_to_end(session_id)
        return session

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def drop_admin(self, admin_id: str) -> int:
        """End every session of an admin (revoked); how many there were."""
        ids = [s.id for s in self._sessions.values() if s.admin_id == admin_id]
        for session_id in ids:
            del self._sessions[session_id]
        return len(ids)
