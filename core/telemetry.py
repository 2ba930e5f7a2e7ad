"""What the gateway tells its observers about each request.

After a response has been sent, the pipeline builds one ``RequestRecord``
and hands it to every observer (the metrics, the access log). Observers are
synchronous and must not block: they count, or queue a line for a task that
writes it. That keeps telemetry off the response's critical path and keeps
the pipeline ignorant of what is done with the record.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

__all__ = ["Observer", "RequestRecord"]


class RequestRecord(msgspec.Struct, frozen=True, gc=False):
    at: float  # wall clock, seconds since the epoch
    request_id: str
    method: str
    path: str
    route: str | None  # None: no route matched
    upstream: str | None
    status: int
    outcome: str  # "ok", "upstream_error" (upstream 5xx), or the gateway's error code
    key_id: str | None  # never the key itself
    client_ip: str
    duration_seconds: float  # whole request, as the gateway saw it
    upstream_seconds: float | None  # waiting for the upstream's answer head
    retries: int = 0


Observer = Callable[[RequestRecord], None]
