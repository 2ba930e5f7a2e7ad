"""What the gateway tells its observers about each request.

After a response has been sent, the pipeline builds one ``RequestRecord``
and hands it to every observer (the metrics, the access log). Observers are
synchronous and must not block: they count, or queue a line for a task that
writes it. That keeps telemetry off the response's critical path and keeps
the pipeline ignorant of what is done with the record.

Every request the gateway answered or that was abandoned gets one record:
answered ones with their status, a request whose client left before it
could be answered with status 499 and outcome ``client_closed`` (nginx's
convention; nothing is sent), and a request the front door refused by itself
before routing (400, 408, 413, 431) with its problem code
(``refused_record``), so probing shows in the access log.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from triogate.http import Response

__all__ = [
    "CLIENT_CLOSED",
    "CLIENT_CLOSED_OUTCOME",
    "Observer",
    "RequestRecord",
    "outcome_of",
    "refused_record",
]

# A request whose client left before it could be answered: logged as 499
# (as nginx does), never sent.
CLIENT_CLOSED = 499
CLIENT_CLOSED_OUTCOME = "client_closed"
# Longest method and path a refused request puts in its record: a probe may
# send a request target of many kilobytes.
REFUSED_METHOD_CHARS = 32
REFUSED_PATH_CHARS = 2048


class RequestRecord(msgspec.Struct, frozen=True, gc=False):
    at: float  # wall clock, seconds since the epoch
    request_id: str
    method: str
    path: str
    route: str | None  # None: no route matched
    upstream: str | None
    status: int
    # "ok", "upstream_error" (upstream 5xx), "client_closed" (499: the client
    # left first), or the gateway's error code
    outcome: str
    key_id: str | None  # never the key itself
    client_ip: str
    duration_seconds: float  # whole request, as the gateway saw it
    upstream_seconds: float | None  # waiting for the upstream's answer head
    retries: int = 0


Observer = Callable[[RequestRecord], None]


def outcome_of(response: Response) -> str:
    status = response.status
    if response.from_gateway:
        if status == CLIENT_CLOSED:
            return CLIENT_CLOSED_OUTCOME
        problem = response.problem
        return problem.code if problem is not None else "error"
    return "upstream_error" if status >= 500 else "ok"


def refused_record(
    method: str,
    target: str,
    client_ip: str,
    response: Response,
    *,
    request_id: str,
    started_at: float | None = None,
) -> RequestRecord:
    """The record of a request the front door refused before routing. Only
    the path of ``target`` is kept (a query may carry secrets), cut to a
    bounded length; ``request_id`` is used when the answer is not a problem."""
    problem = response.problem
    return RequestRecord(
        at=time.time(),
        request_id=problem.request_id if problem is not None else request_id,
        method=method[:REFUSED_METHOD_CHARS],
        path=target.partition("?")[0][:REFUSED_PATH_CHARS],
        route=None,
        upstream=None,
        status=response.status,
        outcome=problem.code if problem is not None else "error",
        key_id=None,
        client_ip=client_ip,
        duration_seconds=(
            max(0.0, time.monotonic() - started_at) if started_at is not None else 0.0
        ),
        upstream_seconds=None,
    )
