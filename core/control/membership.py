"""The membership indexes of identities and plans: which keys name an
identity (``IDENTITY_KEYS``), which keys and identities name a plan
(``PLAN_MEMBERS``). An index key is the owner's id, a 0 byte, the member's
id (ids never hold a 0 byte); the value is empty.

Members are read as a stream (``members``), never loaded whole: an identity
with ten thousand keys is paged through, and its usage summed, one key at a
time.
"""

from __future__ import annotations

from collections.abc import Iterator

from triogate.storage import ReadTxn, Table, WriteTxn

__all__ = ["add_member", "has_member", "member_key", "members", "remove_member"]

_SEP = b"\x00"


def member_key(owner_id: str, member_id: str) -> bytes:
    return owner_id.encode() + _SEP + member_id.encode()


def add_member(txn: WriteTxn, table: Table, owner_id: str, member_id: str) -> None:
    txn.put(table, member_key(owner_id, member_id), b"")


def remove_member(txn: WriteTxn, table: Table, owner_id: str, member_id: str) -> None:
    txn.delete(table, member_key(owner_id, member_id))


def members(
    txn: ReadTxn,
    table: Table,
    owner_id: str,
    *,
    after: str | None = None,
    reverse: bool = False,
) -> Iterator[str]:
    """The member ids of ``owner_id`` in id order (time order: ids are
    time-ordered), newest first with ``reverse``, strictly after ``after``."""
    prefix = owner_id.encode() + _SEP
    start = None if after is None else prefix + after.encode()
    for key, _ in txn.scan(table, prefix=prefix, after=start, reverse=reverse):
        yield key[len(prefix) :].decode()


def has_member(txn: ReadTxn, table: Table, owner_id: str) -> bool:
    return next(members(txn, table, owner_id), None) is not None
