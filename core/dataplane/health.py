"""Active health checks: each target of an upstream with a ``health_check``
table is probed every ``interval_seconds`` with a ``GET path``; after
``unhealthy_threshold`` failed probes in a row it is taken out of the
balancer, after ``healthy_threshold`` good ones it is back. A probe fails on
a connect error, a timeout, or a status outside ``healthy_statuses``.

The checkers are tasks in a nursery the server owns for the current config
(a reload replaces them with the new config's). Probes use their own short
connections (``Connection: close``, never pooled: a probe must not take a
pooled connection from real traffic), through the same upstream client and
codec as the requests they stand for (exchange.py, ``triogate.http.h1client``).
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from triogate.config import HealthCheckConfig
from triogate.dataplane.exchange import UpstreamConnection
from triogate.dataplane.upstream import TargetPool, Upstream
from triogate.errors import UpstreamError
from triogate.http.h1client import request_head

__all__ = ["check_once", "run_health_checks"]

log = logging.getLogger("triogate.dataplane.health")

PROBE_HEADERS: Final = ((b"user-agent", b"triogate-health"), (b"connection", b"close"))


class _Probe:
    """The owner of a probe's connection (``exchange.ConnectionOwner``):
    one request, then the connection is closed, never pooled."""

    __slots__ = ("authority", "send_timeout")

    def __init__(self, authority: str, send_timeout: float) -> None:
        self.authority = authority
        self.send_timeout = send_timeout

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        conn.close()


async def check_once(pool: TargetPool, check: HealthCheckConfig) -> bool:
    """One probe of one target: True if it answered a healthy status in time."""
    timeout = check.timeout_seconds
    with trio.move_on_after(timeout):
        try:
            sock = await pool.open_socket(timeout)  # TLS too for an https target
        except (OSError, UpstreamError):
            return False
        conn = UpstreamConnection(sock, _Probe(pool.authority, timeout))
        try:
            head = request_head("GET", pool.base_path + check.path, pool.authority, PROBE_HEADERS)
            response = await conn.exchange("GET", head, None, timeout)
            if response.body is not None:
                await response.body.aclose()  # only the status matters
        except (OSError, UpstreamError):
            return False
        finally:
            conn.close()
        status = response.status
        return status in check.healthy_statuses if check.healthy_statuses else status < 400
    return False


async def _watch(pool: TargetPool, check: HealthCheckConfig, upstream: str) -> None:
    good = bad = 0
    while True:
        ok = await check_once(pool, check)
        if ok:
            good, bad = good + 1, 0
            if not pool.healthy and good >= check.healthy_threshold:
                pool.healthy = True
                log.info("upstream %s target %s is healthy again", upstream, pool.url)
        else:
            good, bad = 0, bad + 1
            if pool.healthy and bad >= check.unhealthy_threshold:
                pool.healthy = False
                log.warning("upstream %s target %s is unhealthy", upstream, pool.url)
        await trio.sleep(check.interval_seconds)


async def run_health_checks(
    upstreams: dict[str, Upstream], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Watch every target of every upstream that has a health check, until
    cancelled."""
    async with trio.open_nursery() as nursery:
        for name, upstream in upstreams.items():
            check = upstream.config.health_check
            if check is None:
                continue
            for pool in upstream.pools:
                nursery.start_soon(_watch, pool, check, name)
        task_status.started()
