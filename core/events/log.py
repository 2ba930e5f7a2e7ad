"""The delivery log as the admin API shows it (``GET /events/deliveries``),
and the manual retry (``POST /events/deliveries/{id}/retry``).

A page is newest first with the same cursor paging as ``/keys``
(``control.paging``); the filters (event type, status, webhook) are
checked per record, within the paging's scan budget.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from msgspec import Struct

from triogate.control.audit import Actor, append_audit
from triogate.control.ids import is_valid_id
from triogate.control.paging import decode_cursor, take_page
from triogate.errors import Conflict, NotFound, ValidationError
from triogate.events.outbox import Outbox, delivery_decoder, schedule
from triogate.storage import Store, Table, WriteTxn
from triogate.storage.records import DeliveryRecord

__all__ = ["AttemptView", "DeliveryLog", "DeliveryPage", "DeliveryView"]

_event = msgspec.json.Decoder(dict[str, Any])


class AttemptView(Struct):
    at: datetime
    status_code: int | None  # the receiver's answer; null when none came
    error: str | None  # null when delivered
    duration_ms: float


class DeliveryView(Struct):
    id: str
    event_id: str
    event_type: str
    webhook: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    created_at: datetime
    next_attempt_at: datetime | None
    attempts: list[AttemptView]
    last_status_code: int | None
    last_error: str | None
    key_id: str | None
    event: dict[str, Any]  # the body as sent


class DeliveryPage(Struct):
    items: list[DeliveryView]
    next_cursor: str | None


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def delivery_view(r: DeliveryRecord) -> DeliveryView:
    last = r.attempts[-1] if r.attempts else None
    return DeliveryView(
        id=r.id,
        event_id=r.event_id,
        event_type=r.event_type,
        webhook=r.webhook,
        url=r.url,
        status=r.status,  # type: ignore[arg-type]
        created_at=_utc(r.created_at),
        next_attempt_at=None if r.next_attempt_at is None else _utc(r.next_attempt_at),
        attempts=[AttemptView(_utc(a.at), a.status, a.error, a.duration_ms) for a in r.attempts],
        last_status_code=None if last is None else last.status,
        last_error=None if last is None else last.error,
        key_id=r.key_id,
        event=_event.decode(r.payload),
    )


class DeliveryLog:
    def __init__(self, store: Store, outbox: Outbox, *, clock: Callable[[], float]) -> None:
        self._store = store
        self._outbox = outbox
        self._clock = clock

    def __repr__(self) -> str:
        return f"<DeliveryLog {self._store!r}>"

    def list(
        self,
        *,
        limit: int,
        cursor: str | None = None,
        event: str | None = None,
        status: str | None = None,
        webhook: str | None = None,
    ) -> DeliveryPage:
        after = decode_cursor(cursor, "dlv")

        def keep(r: DeliveryRecord) -> bool:
            return (
                (event is None or r.event_type == event)
                and (status is None or r.status == status)
                and (webhook is None or r.webhook == webhook)
            )

        with self._store.read() as txn:
            rows = (
                (k.decode(), delivery_decoder.decode(v))
                for k, v in txn.scan(Table.EVENT_DELIVERIES, after=after, reverse=True)
            )
            items, next_cursor = take_page(rows, limit=limit, keep=keep, view=delivery_view)
        return DeliveryPage(items=items, next_cursor=next_cursor)

    def get(self, delivery_id: str) -> DeliveryView:
        with self._store.read() as txn:
            return delivery_view(self._load(txn, delivery_id))

    @staticmethod
    def _load(txn: Any, delivery_id: str) -> DeliveryRecord:
        if not is_valid_id(delivery_id, "dlv"):
            raise ValidationError.single("id", "not a delivery id")
        raw = txn.get(Table.EVENT_DELIVERIES, delivery_id.encode())
        if raw is None:
            raise NotFound(f"no delivery {delivery_id}")
        return delivery_decoder.decode(raw)

    async def retry(self, delivery_id: str, actor: Actor) -> DeliveryView:
        """Deliver a delivered or failed event again, now, with a fresh
        schedule of attempts (409 while it is still pending)."""
        now = self._clock()

        def fn(txn: WriteTxn) -> DeliveryRecord:
            record = self._load(txn, delivery_id)
            if record.status == "pending":
                raise Conflict(f"delivery {delivery_id} is pending: it is retried already")
            # A webhook no longer configured fails the first attempt at once,
            # saying so: the log tells it, and nothing is sent anywhere.
            updated = schedule(txn, record, status="pending", tries=0, next_attempt_at=now)
            append_audit(
                txn,
                actor=actor,
                action="event.retry",
                target_id=delivery_id,
                now=now,
                details={"event_id": record.event_id, "webhook": record.webhook},
            )
            return updated

        updated = await self._store.write(fn)
        wake = self._outbox.wake
        if wake is not None:
            wake()
        return delivery_view(updated)
