"""The durable outbox: events written in the transaction that made them.

Theory of operation
-------------------
An event is written once per webhook subscribed to its type, as a
``DeliveryRecord`` (``Table.EVENT_DELIVERIES``, by delivery id: the
delivery log) and, while it waits, an entry in ``Table.EVENT_OUTBOX``
keyed by *when it is due* (8-byte big-endian milliseconds, then the
delivery id). The deliverer (``deliver``) therefore finds what is due with
one ordered scan that stops at the first entry in the future, however many
deliveries wait for a receiver that is down; a retry moves the entry to its
new due time, a delivery (or a final failure) deletes it.

``Outbox.emit`` is called inside a storage write function (the key
service's, the data-plane events' batch): the event exists exactly when
that write commits. It runs in the store's writer thread, so it only
computes over the transaction, and wakes the deliverer through the trio
token, the one thread-safe door into trio.

The body is built once per event: ``{"id": "evt_…", "type", "created_at",
"data": {...}}`` (JSON), the same bytes for every webhook; the signature
is made at each attempt (``signing``), with the attempt's own time.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from triogate.config import EventsConfig, WebhookConfig
from triogate.control.ids import IdGenerator
from triogate.storage import Table, WriteTxn, codec
from triogate.storage.records import DeliveryAttempt, DeliveryRecord

__all__ = [
    "ATTEMPTS_KEPT",
    "Outbox",
    "delivery_decoder",
    "due_key",
    "event_body",
    "put_delivery",
    "record_attempt",
    "retry_delay",
    "schedule",
]

#: Attempts a delivery record keeps (the newest): a record stays small
#: however many manual retries it had.
ATTEMPTS_KEPT: Final = 30

delivery_decoder: Final = msgspec.msgpack.Decoder(DeliveryRecord)
_json: Final = msgspec.json.Encoder()
_DUE: Final = struct.Struct(">Q")


def due_key(due: float, delivery_id: str) -> bytes:
    """The outbox key: due time first, so a scan meets the earliest first."""
    return _DUE.pack(max(0, int(due * 1000))) + delivery_id.encode()


def due_of(key: bytes) -> float:
    """The due time an outbox key holds (seconds)."""
    (ms,) = _DUE.unpack_from(key)
    return float(ms) / 1000.0


def event_body(event_id: str, event_type: str, data: dict[str, Any], now: float) -> bytes:
    return _json.encode(
        {
            "id": event_id,
            "type": event_type,
            "created_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "data": data,
        }
    )


def retry_delay(
    tries: int, config: EventsConfig, rand: Callable[[], float] = random.random
) -> float:
    """The wait after the ``tries``-th failed attempt: ``retry_base_seconds``
    doubled per attempt up to ``retry_max_seconds``, then ±20% jitter (so
    deliveries that failed together do not all come back together)."""
    delay = min(config.retry_base_seconds * 2.0 ** max(0, tries - 1), config.retry_max_seconds)
    return delay * (0.8 + 0.4 * rand())


def put_delivery(txn: WriteTxn, record: DeliveryRecord) -> None:
    txn.put(Table.EVENT_DELIVERIES, record.id.encode(), codec.encode(record))
    if record.status == "pending" and record.next_attempt_at is not None:
        txn.put(Table.EVENT_OUTBOX, due_key(record.next_attempt_at, record.id), b"")


def schedule(txn: WriteTxn, record: DeliveryRecord, **changes: Any) -> DeliveryRecord:
    """Replace ``record`` with ``changes``, moving its outbox entry."""
    if record.status == "pending" and record.next_attempt_at is not None:
        txn.delete(Table.EVENT_OUTBOX, due_key(record.next_attempt_at, record.id))
    updated = msgspec.structs.replace(record, **changes)
    put_delivery(txn, updated)
    return updated


def record_attempt(
    txn: WriteTxn,
    delivery_id: str,
    attempt: DeliveryAttempt,
    config: EventsConfig,
    rand: Callable[[], float] = random.random,
) -> DeliveryRecord | None:
    """Log ``attempt`` on the delivery and decide what comes next:
    delivered, retried after ``retry_delay``, or failed for good after
    ``max_attempts``. None when the delivery is gone or no longer pending."""
    raw = txn.get(Table.EVENT_DELIVERIES, delivery_id.encode())
    if raw is None:
        return None
    record = delivery_decoder.decode(raw)
    if record.status != "pending":
        return None
    tries = record.tries + 1
    attempts = (*record.attempts, attempt)[-ATTEMPTS_KEPT:]
    if attempt.error is None:
        return schedule(
            txn, record, status="delivered", next_attempt_at=None, tries=tries, attempts=attempts
        )
    if tries >= config.max_attempts:
        return schedule(
            txn, record, status="failed", next_attempt_at=None, tries=tries, attempts=attempts
        )
    due = attempt.at + retry_delay(tries, config, rand)
    return schedule(txn, record, next_attempt_at=due, tries=tries, attempts=attempts)


class Outbox:
    """``control.eventsink.EventSink``: writes events for the webhooks
    subscribed to them."""

    def __init__(self, webhooks: Sequence[WebhookConfig]) -> None:
        by_type: dict[str, list[WebhookConfig]] = {}
        for hook in webhooks:
            for event_type in dict.fromkeys(hook.events):
                by_type.setdefault(event_type, []).append(hook)
        self._by_type = {t: tuple(hooks) for t, hooks in by_type.items()}
        # Its own generator: emit runs in the store's one writer thread.
        self._ids = IdGenerator()
        #: Called (from any thread) after an emit: wakes the deliverer.
        self.wake: Callable[[], None] | None = None
        self.emitted = 0

    def __repr__(self) -> str:
        return f"<Outbox {sorted(self._by_type)} emitted={self.emitted}>"

    def wants(self, event_type: str) -> bool:
        """Whether any webhook is subscribed to ``event_type``."""
        return event_type in self._by_type

    def emit(self, txn: WriteTxn, event_type: str, data: dict[str, Any], now: float) -> None:
        hooks = self._by_type.get(event_type)
        if not hooks:
            return
        event_id = self._ids("evt", now)
        body = event_body(event_id, event_type, data, now)
        key_id = data.get("key_id")
        for hook in hooks:
            put_delivery(
                txn,
                DeliveryRecord(
                    id=self._ids("dlv", now),
                    event_id=event_id,
                    event_type=event_type,
                    webhook=hook.label,
                    url=hook.url,
                    payload=body,
                    created_at=now,
                    status="pending",
                    next_attempt_at=now,
                    key_id=key_id if isinstance(key_id, str) else None,
                ),
            )
        self.emitted += 1
        wake = self.wake
        if wake is not None:
            wake()
