"""Where the control plane's events go: declared here, where they are made.

A key change and its event are one write: the key service calls
``EventSink.emit`` inside the very storage write function that makes the
change, so the event is in the outbox exactly when the change committed
(a refused or rolled-back change leaves no event). ``triogate.events.Outbox``
implements it; the runtime hands it to the services (``KeyService.events``),
so control/ never imports the events package.

What an event says about a key is ``key_data``: ids and settings, never a
secret (no plaintext, digest or hint of the key, no owner or metadata,
which storage seals).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from triogate.control.keyrules import effective_status
from triogate.storage import KeyRecord, WriteTxn

__all__ = ["EventSink", "key_data"]


class EventSink(Protocol):
    def emit(self, txn: WriteTxn, event_type: str, data: dict[str, Any], now: float) -> None:
        """Put the event into the outbox within ``txn``, once for every
        webhook subscribed to ``event_type`` (nothing when none is). Pure
        computation over ``txn``: it runs in the store's writer thread."""
        ...


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def key_data(record: KeyRecord, now: float, **extra: Any) -> dict[str, Any]:
    """A key as its events describe it (the ``data`` object)."""
    data: dict[str, Any] = {
        "key_id": record.id,
        "name": record.name,
        "status": effective_status(record, now),
        "enabled": record.enabled,
        "keyspace": record.keyspace,
        "identity_id": record.identity_id,
        "plan_id": record.plan_id,
        "expires_at": _iso(record.expires_at),
    }
    data.update(extra)
    return data
