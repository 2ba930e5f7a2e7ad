"""What an actor's admission gives (``Admission``) and shows (``ActorSnapshot``).

Apart from ``keyactor`` because that module is compiled with mypyc, which
drops a msgspec Struct's class options (``gc=False``, ``frozen=True``).
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from triogate.policy.limits import Decision, Reservation

__all__ = ["ActorSnapshot", "Admission", "Refusal"]


class Refusal(StrEnum):
    """Why an admission was refused (the problem code the plugin answers with)."""

    RATE_LIMITED = "RATE_LIMITED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"


class Admission(msgspec.Struct, gc=False):
    """The outcome of admitting one request: the decision to report in
    headers (the most restrictive limit), and how to undo it."""

    allowed: bool
    code: Refusal | None
    decisions: list[Decision]
    reservation: Reservation | None
    credits_taken: int
    credits_left: int | None


class ActorSnapshot(msgspec.Struct, frozen=True):
    """What one actor holds right now (tests, debugging)."""

    key: str
    unflushed_requests: int
    requests: int  # flushed and unflushed
    credits: int | None
    last_used_at: float | None
    limits: dict[str, float]  # GCRA state by limit key
    dirty: bool
