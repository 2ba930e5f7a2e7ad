"""A limit's state that lives in Redis (``decide`` builds them).

A module of its own because ``LimitState`` is compiled with mypyc and an
interpreted class cannot subclass a compiled one: this one is compiled too
(pyproject's ``[tool.triogate.native]``), while ``decide`` keeps its msgspec
Structs uncompiled.
"""

from __future__ import annotations

from triogate.policy.ratelimit import LimitState

__all__ = ["ClusterState"]


class ClusterState(LimitState):
    """A limit's state in a ``Reservation`` from Redis: where it lives (the
    numbers stay in Redis; ``release`` is the ``UNDO`` script)."""

    __slots__ = ("rkey", "subject")

    def __init__(self, subject: str, rkey: str) -> None:
        super().__init__()
        self.subject = subject
        self.rkey = rkey
