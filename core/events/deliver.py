"""The deliverer: one task that drains the outbox to the webhooks.

Theory of operation
-------------------
The loop reads what is due (``outbox``: one ordered scan of
``EVENT_OUTBOX`` that stops at the first entry in the future), starts an
attempt for each in its own task, and sleeps until the next entry is due,
``POLL_SECONDS`` at most (events written by another process, the CLI or
another worker, are seen that late), or until an emit in this process
wakes it.

An attempt is one POST with the signed body (``signing``) through httpx,
within ``[events] timeout_seconds`` as a whole (connect, send, the
answer's head). A 2xx is delivered; anything else is a failure retried
with back-off (``outbox.record_attempt``): a 3xx too, since redirects are
never followed (a webhook URL that redirects is a wrong URL, and following
it would send the event where nobody configured it), a timeout, a refused
connection. The answer's body is never read. Attempts run concurrently, at
most ``MAX_IN_FLIGHT`` in all and ``MAX_PER_WEBHOOK`` per webhook, so a
receiver that hangs holds only its own deliveries back; nothing on the
request path ever waits for a receiver.

Delivery is at least once: an attempt whose outcome was not written (the
process stopped in between) is made again, so receivers deduplicate by the
event id. Only one process delivers (worker 0); the outbox is shared by all.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from functools import partial
from typing import Final

import httpx
import trio

from triogate import __version__
from triogate.config import EventsConfig, WebhookConfig
from triogate.events.outbox import Outbox, delivery_decoder, due_of, record_attempt
from triogate.events.retention import sweep_expired
from triogate.events.signing import SIGNATURE_HEADER, signature_header
from triogate.storage import Store, Table
from triogate.storage.records import DeliveryAttempt, DeliveryRecord

__all__ = ["MAX_IN_FLIGHT", "MAX_PER_WEBHOOK", "POLL_SECONDS", "Deliverer"]

log = logging.getLogger("triogate.events")

POLL_SECONDS: Final = 1.0
MAX_IN_FLIGHT: Final = 32
MAX_PER_WEBHOOK: Final = 8
#: Due entries read per scan (the rest wait for the next one).
SCAN_LIMIT: Final = 512
#: How often old deliveries and marks are swept (``retention``).
SWEEP_SECONDS: Final = 60.0
ERROR_MAX: Final = 200


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:ERROR_MAX]


class Deliverer:
    def __init__(
        self,
        store: Store,
        config: EventsConfig,
        outbox: Outbox,
        *,
        clock: Callable[[], float],
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._config = config
        self._outbox = outbox
        self._clock = clock
        self._rand = rand
        self._hooks: dict[str, WebhookConfig] = {h.label: h for h in config.webhooks}
        self._in_flight: set[str] = set()
        self._per_hook: dict[str, int] = {}
        self._wakeup = trio.Event()
        self.attempts = 0

    def __repr__(self) -> str:
        return f"<Deliverer {len(self._in_flight)} in flight, {self.attempts} attempts>"

    def _wake(self) -> None:
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled (attempts in flight are cancelled with
        it and made again by the next start)."""
        token = trio.lowlevel.current_trio_token()

        def wake() -> None:
            with contextlib.suppress(trio.RunFinishedError):  # stopping: nothing to wake
                token.run_sync_soon(self._wake)

        timeout = httpx.Timeout(self._config.timeout_seconds)
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=8)
        # No proxies or certificates from the environment, no redirects:
        # a delivery goes to the configured URL and nowhere else.
        async with (
            httpx.AsyncClient(
                timeout=timeout, limits=limits, follow_redirects=False, trust_env=False
            ) as client,
            trio.open_nursery() as attempts,
        ):
            self._outbox.wake = wake
            task_status.started()
            try:
                swept_at = -SWEEP_SECONDS
                while True:
                    if trio.current_time() - swept_at >= SWEEP_SECONDS:
                        swept_at = trio.current_time()
                        await self._sweep()
                    wait = self._start_due(client, attempts)
                    with trio.move_on_after(wait):
                        await self._wakeup.wait()
                    self._wakeup = trio.Event()
            finally:
                self._outbox.wake = None
                attempts.cancel_scope.cancel()

    async def _sweep(self) -> None:
        try:
            await sweep_expired(self._store, self._clock(), self._config.retention_days)
        except Exception:
            log.exception("sweeping old webhook deliveries failed; will try again")

    def _start_due(self, client: httpx.AsyncClient, nursery: trio.Nursery) -> float:
        """Start an attempt for every due delivery there is room for; the
        seconds until the next one is due (``POLL_SECONDS`` at most)."""
        now = self._clock()
        wait = POLL_SECONDS
        with self._store.read() as txn:
            for n, (key, _) in enumerate(txn.scan(Table.EVENT_OUTBOX)):
                due = due_of(key)
                if due > now:
                    wait = min(wait, due - now)
                    break
                if n >= SCAN_LIMIT or len(self._in_flight) >= MAX_IN_FLIGHT:
                    break
                delivery_id = key[8:].decode()
                if delivery_id in self._in_flight:
                    continue
                raw = txn.get(Table.EVENT_DELIVERIES, delivery_id.encode())
                if raw is None:
                    continue  # swept meanwhile: the retention sweep drops the entry
                record = delivery_decoder.decode(raw)
                if self._per_hook.get(record.webhook, 0) >= MAX_PER_WEBHOOK:
                    continue
                self._in_flight.add(delivery_id)
                self._per_hook[record.webhook] = self._per_hook.get(record.webhook, 0) + 1
                nursery.start_soon(self._attempt, client, record)
        return max(wait, 0.0)

    async def _attempt(self, client: httpx.AsyncClient, record: DeliveryRecord) -> None:
        try:
            attempt = await self._send(client, record)
            self.attempts += 1
            try:
                await self._store.write(
                    partial(
                        record_attempt,
                        delivery_id=record.id,
                        attempt=attempt,
                        config=self._config,
                        rand=self._rand,
                    )
                )
            except Exception:
                # Kept due: made again (at least once, as documented).
                log.exception("recording webhook delivery %s failed", record.id)
            if attempt.error is not None:
                log.info(
                    "webhook %s: delivery %s of %s failed: %s",
                    record.webhook,
                    record.id,
                    record.event_type,
                    attempt.error,
                )
        finally:
            self._in_flight.discard(record.id)
            self._per_hook[record.webhook] -= 1
            self._wakeup.set()  # its webhook has room again

    async def _send(self, client: httpx.AsyncClient, record: DeliveryRecord) -> DeliveryAttempt:
        at = self._clock()
        hook = self._hooks.get(record.webhook)
        if hook is None:
            # Its webhook left the config: nobody to deliver to, ever.
            return DeliveryAttempt(at, None, "the webhook is no longer configured")
        timestamp = int(at)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"triogate/{__version__}",
            SIGNATURE_HEADER: signature_header(hook.secret, timestamp, record.payload),
            "Triogate-Event-Id": record.event_id,
            "Triogate-Event-Type": record.event_type,
            "Triogate-Delivery-Id": record.id,
        }
        status: int | None = None
        error: str | None = None
        started = trio.current_time()
        timeout = self._config.timeout_seconds
        with trio.move_on_after(timeout) as scope:
            try:
                async with client.stream(
                    "POST", hook.url, content=record.payload, headers=headers
                ) as response:
                    status = response.status_code
            except httpx.TimeoutException:
                error = f"timed out after {timeout:g}s"
            except (httpx.HTTPError, OSError) as exc:
                error = _describe(exc)
        duration_ms = round((trio.current_time() - started) * 1000, 1)
        if scope.cancelled_caught and status is None:
            error = f"timed out after {timeout:g}s"
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}"
            if 300 <= status < 400:
                error += " (a redirect: redirects are not followed)"
        return DeliveryAttempt(at, status, error, duration_ms)
