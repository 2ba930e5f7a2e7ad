"""Limit and credit decisions in Redis, sans-IO: what one ``DECIDE`` or
``UNDO`` script run is sent (keys and arguments) and what its reply means.
``limits.ClusterLimits`` sends them through the batcher.

Theory of operation
-------------------
A decision is the local one (``policy.ratelimit.acquire``, then every
balance taken or none) made by the ``DECIDE`` script (``lua.py``) on the
states in Redis, so every node shares them. One run covers every limit of a
request (the key's own, its identity pool's, a route's) and every balance it
spends from: all-or-nothing across them, as in one process.

A balance is sent with what this node knows of it (``Balance``): the credits
version, the balance to start from if Redis has none yet (or an older
version: a PATCH on some node set new credits), the last refill the node
computed (the script applies a refill once, whichever node saw it first)
and the credits this node spent alone while Redis was unreachable (charged
now, never below zero). The reply carries each balance as Redis holds it
afterwards, so the node's actor mirrors the cluster's.

Keys: ``{NS}:l:<subject>\\x00<limit key>`` (a limit's state),
``{NS}:c:<subject>`` (a balance), ``{NS}:u:<subject>`` (usage counters). The
hash tag keeps a request's keys in one slot, so the scripts run on a Redis
Cluster too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from triogate.cluster.clusterstate import ClusterState
from triogate.policy.ratelimit import Decision, Limit, Reservation

__all__ = [
    "DEFAULT_NAMESPACE",
    "Balance",
    "BalanceAfter",
    "ClusterState",
    "Verdict",
    "credit_key",
    "decide_call",
    "limit_key",
    "parse_decide",
    "undo_call",
    "usage_call",
    "usage_key",
]

DEFAULT_NAMESPACE: Final = "triogate"

#: ``Verdict.status`` values, as the script answers.
REFUSED: Final = 0
GRANTED: Final = 1
SHORT: Final = 2


def _f(x: float) -> str:
    # repr round-trips a double exactly; Lua's tonumber reads it back.
    return repr(float(x))


#: A limit's arguments (limit, period, algorithm) as sent: the same for
#: every decision, so formatted once per ``Limit`` (bounded: cleared when full).
_LIMIT_ARGS: dict[Limit, tuple[str, str, str]] = {}
LIMIT_ARGS_MAX: Final = 4096


def _limit_args(limit: Limit) -> tuple[str, str, str]:
    args = _LIMIT_ARGS.get(limit)
    if args is None:
        if len(_LIMIT_ARGS) >= LIMIT_ARGS_MAX:
            _LIMIT_ARGS.clear()
        args = _LIMIT_ARGS[limit] = (
            str(limit.limit),
            _f(limit.period),
            "g" if limit.algorithm == "gcra" else "s",
        )
    return args


def limit_key(ns: str, subject: str, limit: Limit) -> str:
    return f"{{{ns}}}:l:{subject}\x00{limit.state_key or limit.name}"


def credit_key(ns: str, subject: str) -> str:
    return f"{{{ns}}}:c:{subject}"


def usage_key(ns: str, subject: str) -> str:
    return f"{{{ns}}}:u:{subject}"


class Balance(msgspec.Struct, frozen=True):
    """A balance as this node knows it, sent with a decision."""

    subject: str
    version: int
    #: Where Redis starts from when it has no balance of this version.
    balance: int
    refilled_at: float | None = None
    #: A refill the node found due tops the balance up to this (0: none).
    refill_amount: int = 0
    #: Credits this node spent alone while Redis was unreachable.
    debt: int = 0


class BalanceAfter(msgspec.Struct, frozen=True):
    """A balance as Redis holds it after the decision."""

    version: int
    balance: int
    refilled_at: float | None


class Verdict(msgspec.Struct):
    """A decision's outcome. ``decisions`` are sorted like ``acquire``'s
    (``decisions[0]`` is the one to report)."""

    decisions: list[Decision]
    #: Set when granted: what ``undo`` gives back.
    reservation: Reservation | None
    #: The index in the request's balances of the one that was short.
    short: int | None
    balances: list[BalanceAfter]
    #: The time the script decided at (Redis's clock unless one was sent).
    now: float

    @property
    def granted(self) -> bool:
        return self.reservation is not None


def _severity(d: Decision) -> tuple[bool, int, float]:
    return (d.allowed, d.remaining, -d.retry_after)


def decide_call(
    ns: str,
    items: Sequence[tuple[str, Limit]],
    balances: Sequence[Balance],
    now: float | None,
    cost: int,
) -> tuple[list[str], list[str]]:
    """The keys and arguments of one ``DECIDE`` run (``now`` None: Redis's clock)."""
    keys = [limit_key(ns, subject, limit) for subject, limit in items]
    keys += [credit_key(ns, b.subject) for b in balances]
    args = ["" if now is None else _f(now), str(cost), str(len(items)), str(len(balances))]
    for _, limit in items:
        args += _limit_args(limit)
    for b in balances:
        args += [
            str(b.version),
            str(b.balance),
            "" if b.refilled_at is None else _f(b.refilled_at),
            str(b.refill_amount),
            str(b.debt),
        ]
    return keys, args


def parse_decide(
    reply: Sequence[Any],
    ns: str,
    items: Sequence[tuple[str, Limit]],
    cost: int,
    keys: Sequence[str] | None = None,
) -> Verdict:
    """What a ``DECIDE`` reply means, for the request ``decide_call`` built
    (``keys``: the keys it built, else built again). Numbers come as bytes
    or str: ``float`` and ``int`` read both."""
    now = float(reply[0])
    status = int(reply[1])
    decisions: list[Decision] = []
    at = 3
    for _, limit in items:
        allowed, remaining, reset, wait = reply[at : at + 4]
        at += 4
        decisions.append(
            Decision(limit, bool(int(allowed)), int(remaining), float(reset), float(wait))
        )
    balances = []
    while at + 3 <= len(reply):
        v, b, r = reply[at : at + 3]
        at += 3
        balances.append(BalanceAfter(int(v), int(b), float(r) if r else None))
    if len(decisions) > 1:
        decisions.sort(key=_severity)
    reservation = None
    if status == GRANTED:
        states = tuple(
            (limit, ClusterState(subject, keys[i] if keys else limit_key(ns, subject, limit)))
            for i, (subject, limit) in enumerate(items)
        )
        reservation = Reservation(states, cost, now)
    short = int(reply[2]) - 1 if status == SHORT else None
    return Verdict(decisions, reservation, short, balances, now)


def undo_call(
    ns: str,
    reservation: Reservation | None,
    refunds: Sequence[tuple[str, BalanceAfter, int]],
    now: float | None,
) -> tuple[list[str], list[str]]:
    """The keys and arguments of one ``UNDO`` run: give back ``reservation``
    and, for each (subject, the balance as the decision left it, amount),
    ``amount`` credits (only into that same balance: not after a reset or
    a refill)."""
    items = reservation.items if reservation is not None else ()
    cost = reservation.cost if reservation is not None else 0
    at = reservation.at if reservation is not None else 0.0
    keys: list[str] = []
    args = ["" if now is None else _f(now), str(cost), _f(at), str(len(items)), str(len(refunds))]
    for limit, state in items:
        assert isinstance(state, ClusterState), "a reservation from Redis"
        keys.append(state.rkey)
        args += _limit_args(limit)
    for subject, after, amount in refunds:
        keys.append(credit_key(ns, subject))
        args += [
            str(after.version),
            "" if after.refilled_at is None else _f(after.refilled_at),
            str(amount),
        ]
    return keys, args


def usage_call(
    ns: str,
    subject: str,
    requests: int,
    by_class: Sequence[int],
    taken: int,
    last_used_at: float,
) -> tuple[list[str], list[str]]:
    """The keys and arguments of one ``USAGE`` run: counters added to the
    subject's cluster-wide usage hash."""
    counts = list(by_class) + [0] * (5 - len(by_class))
    args = [str(requests), *(str(c) for c in counts[:5]), str(taken), _f(last_used_at)]
    return [usage_key(ns, subject)], args
