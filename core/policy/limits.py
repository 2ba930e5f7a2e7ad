"""The values a rate-limit decision takes and gives (``ratelimit`` decides).

They are msgspec Structs (built on every decision; a frozen dataclass costs
several times as much to construct) and live apart from the decisions
because ``ratelimit`` is compiled with mypyc, which drops a Struct's class
options (``frozen=True``: a ``Limit`` must hash, it keys caches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from triogate.policy.ratelimit import LimitState

__all__ = ["MAX_LIMIT", "MAX_PERIOD", "MIN_PERIOD", "Algorithm", "Decision", "Limit", "Reservation"]

Algorithm = Literal["gcra", "sliding_window"]

#: The bounds the config and the admin API enforce (a millisecond to a
#: year; one to a billion requests). ``Limit`` clamps its period as well, so
#: a limit stored before the lower bound existed (storage took any positive
#: period, 1e-300 included) still yields finite, sane numbers instead of a 500
#: or a 300-digit header. (Storage always bounded ``limit``.)
MIN_PERIOD = 0.001
MAX_PERIOD = 31_536_000.0
MAX_LIMIT = 1_000_000_000


class Limit(msgspec.Struct, frozen=True, gc=False):
    """A policy: at most ``limit`` requests per ``period`` seconds.
    (msgspec Structs here and below: built on every decision, and a frozen
    dataclass costs several times as much to construct.)"""

    name: str
    limit: int
    period: float
    algorithm: Algorithm = "gcra"
    #: Where the state lives in its owner (default: ``name``); lets two
    #: routes report the same policy name yet count separately.
    state_key: str = ""

    def __post_init__(self) -> None:
        if not MIN_PERIOD <= self.period <= MAX_PERIOD:  # also catches NaN
            period = self.period if self.period == self.period else MAX_PERIOD
            msgspec.structs.force_setattr(self, "period", min(MAX_PERIOD, max(MIN_PERIOD, period)))

    @property
    def key(self) -> str:
        return self.state_key or self.name

    @property
    def interval(self) -> float:
        return self.period / self.limit


class Decision(msgspec.Struct, frozen=True, gc=False):
    """The answer for one limit. ``remaining`` is how many more requests
    would pass right now; ``reset`` the seconds until the limit is whole
    again; ``retry_after`` the seconds until this request would pass (0 if
    it does)."""

    limit: Limit
    allowed: bool
    remaining: int
    reset: float
    retry_after: float


class Reservation(msgspec.Struct, frozen=True):
    """What ``acquire`` took, so that ``release`` can give it back."""

    items: tuple[tuple[Limit, LimitState], ...]
    cost: int
    at: float
