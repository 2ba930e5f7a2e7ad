"""Admin API requests in the access log, beside the proxied ones.

An operator reading the access log sees who changed what and when without a
second log to correlate: each admin request gets one line in the same shape,
with ``route`` set to ``ADMIN_ROUTE``, no upstream, the admin's id where the
key id goes (never the admin key), and the problem code as the outcome of a
refused one. Metrics are not fed: they describe the data plane.
"""

from __future__ import annotations

import time

from triogate.http.netaddr import client_ip
from triogate.telemetry.accesslog import AccessLog
from triogate.telemetry.records import RequestRecord

__all__ = ["ADMIN_ROUTE", "log_admin_request"]

ADMIN_ROUTE = "admin"


def log_admin_request(
    access_log: AccessLog | None,
    *,
    request_id: str,
    method: str,
    path: str,
    status: int,
    problem_code: str | None,
    admin_id: str | None,
    remote: str | None,
    started: float,
) -> None:
    """Queue the line (``AccessLog.observe`` never waits; a full queue drops
    it and counts the drop)."""
    if access_log is None:
        return
    access_log.observe(
        RequestRecord(
            at=time.time(),
            request_id=request_id,
            method=method,
            path=path,
            route=ADMIN_ROUTE,
            upstream=None,
            status=status,
            outcome=problem_code or "ok",
            key_id=admin_id,
            client_ip=client_ip(remote) if remote else "-",
            duration_seconds=max(0.0, time.monotonic() - started),
            upstream_seconds=None,
        )
    )
