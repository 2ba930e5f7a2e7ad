"""Credit operations on a cluster node: ``POST /keys/{id}/credits`` and
``/identities/{id}/credits`` (and the CLI's) on a balance Redis holds.

Theory of operation
-------------------
A balance on a cluster node is the cluster's (``decide.py``): a hash in
Redis that every node's decisions spend from. An operation (set, increment,
decrement) is therefore one ``CREDIT`` script run (``lua.py``), atomic
against every node's spending: it reconciles the balance with what this
node knows exactly as a decision does (a newer credits version replaces it,
a refill due tops it up once, a debt from an outage is charged), then
applies the operation by ``control.credits.apply_op``'s rule. A refused
operation (a decrement past the balance, an increment past ``MAX_BALANCE``)
writes nothing, not even the reconciliation.

The operation is acknowledged only after Redis answered; it is made only
when this node's records are in the cluster (``records_writable``), so its
audit entry can follow. Unreachable (the link says so, or the run fails),
it raises ``StoreUnreachable`` (503
``STORE_UNAVAILABLE``) and nothing of it was applied, except when the
connection broke after Redis ran it (the answer was lost: the 503 says to
look before repeating, as for a lost admin write). The reply is mirrored
into the actor, so this node's views show the new balance at once; every
other node's next decision spends from it.

A node whose replica lags behind a ``PATCH`` made elsewhere sends an older
credits version than Redis holds: Redis keeps its newer balance and the
operation applies to it (the cluster's balance, never the stale one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from triogate.cluster.decide import Balance, BalanceAfter, credit_key
from triogate.cluster.lua import CREDIT
from triogate.cluster.redis import REDIS_ERRORS
from triogate.cluster.status import ReplicaState
from triogate.cluster.store import ClusterStore
from triogate.errors import InsufficientCredits, StoreUnreachable, ValidationError

if TYPE_CHECKING:
    from triogate.cluster.limits import ClusterLimits, CreditHolder

__all__ = [
    "APPLIED",
    "CreditReply",
    "change_credits",
    "credit_call",
    "parse_credit",
    "records_writable",
]

#: ``CreditReply.status`` values, as the script answers.
APPLIED: Final = 1
SHORT: Final = 2
TOO_LARGE: Final = 3


class CreditReply(msgspec.Struct, frozen=True):
    """A ``CREDIT`` run's outcome: the balance before the operation (after
    reconciling) and after it, as Redis holds it (``after.balance`` is
    ``new``; a refused operation changed nothing)."""

    status: int
    old: int
    new: int
    after: BalanceAfter


def credit_call(
    ns: str, balance: Balance, op: str, amount: int, most: int
) -> tuple[list[str], list[str]]:
    """The keys and arguments of one ``CREDIT`` run."""
    args = [
        str(balance.version),
        str(balance.balance),
        "" if balance.refilled_at is None else repr(float(balance.refilled_at)),
        str(balance.refill_amount),
        str(balance.debt),
        op,
        str(amount),
        str(most),
    ]
    return [credit_key(ns, balance.subject)], args


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_credit(reply: Sequence[Any]) -> CreditReply:
    status, old, new, version, refilled = reply
    text = _text(refilled)
    after = BalanceAfter(int(version), int(new), float(text) if text else None)
    return CreditReply(int(status), int(old), int(new), after)


def records_writable(store: object) -> None:
    """``StoreUnreachable`` unless an admin write (the operation's audit
    entry) can be committed now: checked before the operation, so a node
    whose records have not rejoined the cluster (Redis just came back)
    refuses rather than apply an operation it cannot audit."""
    if isinstance(store, ClusterStore):
        state = store.follower.status.state
        if state is not ReplicaState.READY:
            raise StoreUnreachable(
                f"this node's records are {state.value}, not in the cluster: a credit "
                "operation cannot be audited now, so it is not applied (nothing was changed); "
                "try again later"
            )


async def change_credits(
    limits: ClusterLimits,
    holder: CreditHolder,
    record: Any,
    op: str,
    amount: int,
    now: float,
    *,
    most: int,
) -> tuple[int, int] | None:
    """Apply ``op`` of ``amount`` to ``holder``'s balance in Redis (module
    doc): (old, new), or None if the balance's source has no credits.
    ``InsufficientCredits`` / ``ValidationError`` as on a single node;
    ``StoreUnreachable`` when Redis cannot take it."""
    holder.sync_credits(record, now)
    if holder.credits is None:
        return None
    if not limits.link.reachable:
        raise StoreUnreachable(
            "the cluster's Redis is unreachable: credit balances live there, so a credit "
            "operation cannot be applied now (nothing was changed); try again later"
        )
    wire = limits.balance_of(holder, record)
    keys, args = credit_call(limits.namespace, wire, op, amount, most)
    try:
        # Bounded by the batcher's own pipeline timeout; no shorter caller
        # timeout here: an operation given up on could still run later.
        reply = parse_credit(await limits.batcher.call(CREDIT, keys, args))
    except REDIS_ERRORS as exc:
        limits.failed(exc)
        raise StoreUnreachable(
            f"the cluster's Redis did not answer the credit operation ({type(exc).__name__}); "
            "if the connection broke after Redis ran it, it was applied: look at the balance "
            "before repeating it"
        ) from None
    if reply.status == SHORT:
        raise InsufficientCredits(
            f"cannot take {amount} credits: the balance is {reply.old}",
            credits_remaining=reply.old,
        )
    if reply.status == TOO_LARGE:
        raise ValidationError.single("amount", f"the balance would exceed {most}")
    limits.mirror(holder, wire, reply.after)
    return reply.old, reply.new
