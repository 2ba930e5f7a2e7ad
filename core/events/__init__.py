"""Events and webhooks: key changes and data-plane events, written to a
durable LMDB outbox and delivered, signed, to the configured webhooks
(docs/metering.md, "Events and webhooks")."""

from triogate.events.live import LiveEvents
from triogate.events.log import DeliveryLog, DeliveryPage, DeliveryView
from triogate.events.outbox import Outbox
from triogate.events.service import EventService
from triogate.events.signing import SIGNATURE_HEADER, signature_header, verify_signature

__all__ = [
    "SIGNATURE_HEADER",
    "DeliveryLog",
    "DeliveryPage",
    "DeliveryView",
    "EventService",
    "LiveEvents",
    "Outbox",
    "signature_header",
    "verify_signature",
]
