"""A webhook receiver for the event tests: a threaded HTTP server on
127.0.0.1 that records every POST (headers and body) and answers as told:
``ok`` (204), ``error`` (500), ``slow`` (sleeps past any test timeout, then
200) or ``redirect`` (302 to itself). It can stop and start again on the
same port, to play a receiver that was down for a while."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from triogate.control.ids import new_id
from triogate.events import verify_signature
from triogate.events.outbox import event_body, put_delivery
from triogate.storage import Store
from triogate.storage.records import DeliveryAttempt, DeliveryRecord

__all__ = ["Delivery", "Receiver", "stored_delivery", "wait_for"]

SLOW_SECONDS = 3.0


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    def signed_by(self, secret: str) -> bool:
        header = self.headers.get("triogate-signature", "")
        return verify_signature(secret, header, self.body, time.time())

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class Receiver:
    def __init__(self, mode: str = "ok", port: int = 0) -> None:
        self.mode = mode
        self.port = port
        self.received: list[Delivery] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self.received)

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        found = [d.json() for d in self.deliveries()]
        return [e for e in found if event_type is None or e["type"] == event_type]

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.received.append(Delivery(self.path, headers, body))
                mode = receiver.mode
                if mode == "slow":
                    time.sleep(SLOW_SECONDS)
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("location", receiver.url)
                elif mode == "error":
                    self.send_response(500)
                else:
                    self.send_response(204 if mode == "ok" else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Receiver:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(
    check: Callable[[], bool], what: str, timeout: float = 20.0, step: float = 0.05
) -> None:
    """Poll ``check`` until it holds (bounded); fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(step)
    raise AssertionError(f"not within {timeout}s: {what}")


async def stored_delivery(store: Store, status: str = "failed") -> str:
    """A done delivery written straight into ``store`` (for tests of the
    log's endpoints on a gateway without webhooks); its id."""
    now = time.time()
    delivery_id = new_id("dlv", now)
    record = DeliveryRecord(
        id=delivery_id,
        event_id=new_id("evt", now),
        event_type="key.created",
        webhook="gone",
        url="http://127.0.0.1:9/gone",
        payload=event_body("evt_x", "key.created", {"key_id": "key_x"}, now),
        created_at=now,
        status=status,
        next_attempt_at=None,
        attempts=(DeliveryAttempt(now, 500, "HTTP 500"),),
    )
    await store.write(lambda txn: put_delivery(txn, record))
    return delivery_id
