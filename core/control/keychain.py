"""Rotation chains: a key and its successors share one credit balance and
one rate-limiter state.

Theory of operation
-------------------
Every key record names a *state key* (``KeyRecord.state_key``): its own id,
or, for a key made by a rotation, the id of the first key of its rotation
chain (``state_id``, copied by every rotation). The actors are keyed by the
state key, so during a grace period the old and the new key admit requests
in the same actor: one balance, one limiter state, decided atomically as for
one key. Nothing moves at rotation time, so nothing can be lost or doubled
then (an earlier design copied the last *flushed* balance to the new key and
zeroed the old one: a second of spending was refunded, and a metered key's
grace was worthless).

What stays per key: the usage counters (``requests``, ``last_used_at``,
counts by class), written under the key's own id, and everything about the
key itself (scopes, expiry, status). What is shared: the balance and the
limiter state (stored in the usage record under the state key), and so the
settings that govern them, ``credits`` and ``rate_limits``, which a PATCH of
any key of the chain sets on every key of it (``chain``); and ``enabled``, so
that disabling the new key also stops the old one in its grace.

Keys rotated before state keys existed have no ``state_id`` and keep their
own state: nothing about stored records changes meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from triogate.control.keyfields import index_key
from triogate.control.keyrules import effective_status
from triogate.control.keysha256 import drop_sha256
from triogate.storage import Credits, KeyRecord, ReadTxn, Table, UsageRecord, WriteTxn, codec

__all__ = [
    "MAX_CHAIN",
    "LiveBalance",
    "chain",
    "customer_fields",
    "joined_state",
    "live_credits",
    "share_settings",
    "stored_usage",
    "sweep",
    "usage_and_state",
]

#: A bound on the links followed from one key: a chain grows by one key per
#: rotation and ``cleanup`` purges the ones past their grace.
MAX_CHAIN: Final = 10_000

#: The balance an in-memory actor holds for a state key, with the credits
#: version it belongs to, or None when no actor knows it exactly.
LiveBalance = Callable[[str], tuple[int, int] | None]


def stored_usage(txn: ReadTxn, key_id: str) -> UsageRecord:
    raw = txn.get(Table.USAGE, key_id.encode())
    return UsageRecord() if raw is None else codec.usage.decode(raw)


def usage_and_state(txn: ReadTxn, record: KeyRecord) -> tuple[UsageRecord, UsageRecord]:
    """The key's own usage counters, and the usage record holding its
    (chain's) balance: the same record unless the key was rotated into."""
    own = stored_usage(txn, record.id)
    if record.state_key == record.id:
        return own, own
    return own, stored_usage(txn, record.state_key)


def customer_fields(old: KeyRecord) -> dict[str, Any]:
    """What a rotation's new key keeps of ``old`` besides its state: its
    customer, plan, roles, keyspace and whether it is enabled."""
    return {
        "identity_id": old.identity_id,
        "plan_id": old.plan_id,
        "enabled": old.enabled,
        "roles": old.roles,
        "keyspace": old.keyspace,
    }


def joined_state(old: KeyRecord) -> dict[str, Any]:
    """The fields that make a rotation's new key share ``old``'s state: its
    chain's first key, the same credits version (so no actor resets the
    balance) and the same refill schedule. Both then spend one balance and
    one limiter state, exactly, whatever was not flushed yet."""
    return {
        "state_id": old.state_key,
        "credits_version": old.credits_version,
        "credits_set_at": old.credits_set_at,
    }


def live_credits(
    record: KeyRecord, state: UsageRecord, live: LiveBalance | None = None
) -> Credits | None:
    """The key's credits with its chain's balance: the in-memory actor's
    when it has one for the record's credits version, else the balance as
    last flushed (``state`` is the usage record of ``record.state_key``),
    else the balance the record was given."""
    credits = record.credits
    if credits is None:
        return None
    if live is not None:
        known = live(record.state_key)
        if known is not None and known[1] == record.credits_version:
            return msgspec.structs.replace(credits, remaining=known[0])
    if state.credits_remaining is not None and state.credits_version == record.credits_version:
        return msgspec.structs.replace(credits, remaining=state.credits_remaining)
    return credits


def chain(txn: ReadTxn, record: KeyRecord) -> list[KeyRecord]:
    """``record`` and every stored key that shares its state, found by
    following the rotation links both ways (a chain is a line: only an
    active key can be rotated, once). A link to a purged key, or to a key
    with a state of its own (rotated before state keys existed), ends it."""
    state = record.state_key
    found = {record.id: record}
    for link in ("rotated_from", "rotated_to"):
        current = record
        for _ in range(MAX_CHAIN):
            next_id: str | None = getattr(current, link)
            if next_id is None or next_id in found:
                break
            raw = txn.get(Table.KEYS, next_id.encode())
            if raw is None:
                break
            current = codec.key.decode(raw)
            if current.state_key != state:
                break
            found[current.id] = current
    return list(found.values())


def sweep(txn: WriteTxn, now: float) -> tuple[list[str], list[str]]:
    """Mark active keys past expiry ``expired`` and delete rotated keys past
    their grace, with their indexes (the customer ones too) and usage: the
    ids of both. A purged chain's first key keeps its usage record while a
    successor remains: it holds the balance and limiter state they still
    spend."""
    expired: list[KeyRecord] = []
    purged: list[KeyRecord] = []
    states_in_use: set[str] = set()
    for _, raw in txn.scan(Table.KEYS):
        record = codec.key.decode(raw)
        if record.status == "rotated" and (
            record.grace_ends_at is not None and now >= record.grace_ends_at
        ):
            purged.append(record)
            continue
        states_in_use.add(record.state_key)
        if record.status == "active" and effective_status(record, now) == "expired":
            expired.append(record)
    for record in expired:
        updated = msgspec.structs.replace(record, status="expired", updated_at=now)
        txn.put(Table.KEYS, record.id.encode(), codec.encode(updated))
    for record in purged:
        kid = record.id.encode()
        txn.delete(Table.KEYS, kid)
        txn.delete(Table.KEY_DIGESTS, record.digest)
        drop_sha256(txn, record)
        txn.delete(Table.KEY_OWNERS, record.owner_tag + kid)
        index_key(txn, record, None)
        if record.id not in states_in_use:
            txn.delete(Table.USAGE, kid)
    return [r.id for r in expired], [r.id for r in purged]


def share_settings(
    txn: WriteTxn, members: list[KeyRecord], key_id: str, shared: dict[str, Any], now: float
) -> list[str]:
    """Set ``shared`` (credits, rate limits, enabled) on every key of a
    chain but ``key_id`` (its caller writes that one): the ids changed."""
    if not shared:
        return []
    others = [m for m in members if m.id != key_id]
    for other in others:
        changed = msgspec.structs.replace(other, updated_at=now, **shared)
        txn.put(Table.KEYS, other.id.encode(), codec.encode(changed))
    return [m.id for m in others]
