"""Active health checks: each target of an upstream with a ``health_check``
table is probed every ``interval_seconds`` with a ``GET path``; after
``unhealthy_threshold`` failed probes in a row it is taken out of the
balancer, after ``healthy_threshold`` good ones it is back. A probe fails on
a connect error, a timeout, or a status outside ``healthy_statuses``.

The checkers are tasks in a nursery the server owns for the current config
(a reload replaces them with the new config's). Probes use their own short
connections: a probe must not take a pooled connection from real traffic.
"""

from __future__ import annotations

import logging

import httptools
import trio

from triogate.config import HealthCheckConfig
from triogate.dataplane import sockio
from triogate.dataplane.upstream import TargetPool, Upstream

__all__ = ["check_once", "run_health_checks"]

log = logging.getLogger("triogate.dataplane.health")


class _Status:
    def __init__(self) -> None:
        self.status = 0
        self.done = False

    def on_headers_complete(self) -> None:
        self.done = True


async def check_once(pool: TargetPool, check: HealthCheckConfig) -> bool:
    """One probe of one target: True if it answered a healthy status in time."""
    with trio.move_on_after(check.timeout_seconds):
        try:
            sock = await sockio.connect(pool.host, pool.port, check.timeout_seconds)
        except (OSError, trio.TooSlowError):
            return False
        try:
            path = pool.base_path + check.path
            await sockio.send_all(
                sock,
                f"GET {path} HTTP/1.1\r\nhost: {pool.authority}\r\n"
                "user-agent: triogate-health\r\nconnection: close\r\n\r\n".encode("latin-1"),
            )
            result = _Status()
            parser = httptools.HttpResponseParser(result)
            while not result.done:
                data = await sockio.recv(sock, 65536, trio.current_time() + check.timeout_seconds)
                if not data:
                    return False
                parser.feed_data(data)
            status = parser.get_status_code()
            return status in check.healthy_statuses if check.healthy_statuses else status < 400
        except (OSError, httptools.HttpParserError):
            return False
        finally:
            sockio.close(sock)
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
