"""The event service: the outbox, the data-plane events, the deliverer and
the delivery log, built from ``[events]`` and run in the gateway's nursery.

What runs where: every process that serves requests runs the data-plane
events' batch writer (``LiveEvents.run``: its own events only); one
process delivers (``deliver=True``: worker 0 of ``server.workers``, or the
one standalone process), from the outbox every process writes to. The CLI
runs neither: the keys it changes are in the outbox and the serving
gateway delivers them.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from triogate.config import EventsConfig
from triogate.events.deliver import Deliverer
from triogate.events.live import LiveEvents
from triogate.events.log import DeliveryLog
from triogate.events.outbox import Outbox
from triogate.storage import Store

__all__ = ["EventService"]


class EventService:
    def __init__(self, config: EventsConfig, store: Store, *, clock: Callable[[], float]) -> None:
        self.config = config
        self.outbox = Outbox(config.webhooks)
        live = LiveEvents(self.outbox, config, store, clock)
        #: The limiter's hooks; None when no webhook wants a data-plane event.
        self.live: LiveEvents | None = live if live.wanted else None
        self.deliverer = Deliverer(store, config, self.outbox, clock=clock)
        self.log = DeliveryLog(store, self.outbox, clock=clock)

    def __repr__(self) -> str:
        return f"<EventService {len(self.config.webhooks)} webhooks {self.outbox!r}>"

    @property
    def enabled(self) -> bool:
        """Whether any webhook is configured (else nothing is written)."""
        return bool(self.config.webhooks)

    async def run(
        self, *, deliver: bool, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The batch writer, and with ``deliver`` the deliverer, until cancelled."""
        async with trio.open_nursery() as tasks:
            if self.live is not None:
                await tasks.start(self.live.run)
            if deliver and self.enabled:
                await tasks.start(self.deliverer.run)
            task_status.started()
