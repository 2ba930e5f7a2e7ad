"""The audit log: one entry per admin action, written in the same transaction
as the action itself, so an action without its entry (or the reverse) cannot
be observed."""

from __future__ import annotations

from typing import Any

import msgspec

from triogate.control.ids import new_id
from triogate.control.models import AuditPage, AuditView
from triogate.control.paging import decode_cursor, take_page
from triogate.control.timeutil import utc_required
from triogate.storage import AuditRecord, Store, Table, WriteTxn, codec

__all__ = ["Actor", "AuditLog", "append_audit"]


class Actor(msgspec.Struct, frozen=True):
    """Who did it: an admin id (or ``cli`` / ``setup``), and from where."""

    id: str
    source_ip: str | None = None


def append_audit(
    txn: WriteTxn,
    *,
    actor: Actor,
    action: str,
    target_id: str | None,
    now: float,
    details: dict[str, Any] | None = None,
) -> None:
    entry_id = new_id("aud", now)
    record = AuditRecord(
        id=entry_id,
        at=now,
        actor_id=actor.id,
        action=action,
        target_id=target_id,
        source_ip=actor.source_ip,
        details=details or {},
    )
    txn.put(Table.AUDIT, entry_id.encode(), codec.encode(record))


def _view(r: AuditRecord) -> AuditView:
    return AuditView(
        id=r.id,
        at=utc_required(r.at),
        actor_id=r.actor_id,
        action=r.action,
        target_id=r.target_id,
        source_ip=r.source_ip,
        details=r.details,
    )


class AuditLog:
    def __init__(self, store: Store) -> None:
        self._store = store

    def list(
        self,
        *,
        limit: int,
        cursor: str | None = None,
        actor: str | None = None,
        action: str | None = None,
    ) -> AuditPage:
        after = decode_cursor(cursor, "aud")

        def keep(r: AuditRecord) -> bool:
            return (actor is None or r.actor_id == actor) and (action is None or r.action == action)

        with self._store.read() as txn:
            rows = (
                (k.decode(), codec.audit.decode(v))
                for k, v in txn.scan(Table.AUDIT, after=after, reverse=True)
            )
            items, next_cursor = take_page(rows, limit=limit, keep=keep, view=_view)
        return AuditPage(items=items, next_cursor=next_cursor)
