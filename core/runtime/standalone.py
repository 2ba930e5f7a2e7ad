"""``hypercorn triogate.asgi:app`` on its own: the gateway opened in the ASGI
lifespan, from ``TRIOGATE_CONFIG`` (or the embedded defaults).

``open_standalone`` is the ASGI app's ``opener``: it opens the gateway
(storage, services, the pipeline) and runs what ``Server.run`` runs beside
its listeners (``run_services``). Left at lifespan shutdown: the services
stop first (the actors' final flush included), then the pipeline and
storage close.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from triogate.config import load_config
from triogate.dataplane.asgi import GatewayASGI
from triogate.dataplane.health import run_health_checks
from triogate.dataplane.pipeline import Pipeline
from triogate.dataplane.plugin_tasks import run_plugin_tasks
from triogate.runtime.gateway import Gateway, open_gateway
from triogate.runtime.reasons import install_reason_phrases
from triogate.storage.limits_file import discard_limits_env

__all__ = ["app", "open_standalone", "run_services"]


async def run_services(
    gw: Gateway, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """What serves next to the listeners, as ``Server.run`` runs it: the key
    actors (their flusher, and a final flush when cancelled), the access log
    writer (drained when cancelled) and the upstream health checks of the
    built pipeline. Runs until cancelled.

    Without them a standalone ASGI gateway spent credits and counted usage
    in memory only, and lost both on stop."""
    async with trio.open_nursery() as tasks:
        await tasks.start(gw.actors.run)
        await tasks.start(partial(gw.events.run, deliver=True))  # webhooks
        if gw.access_log is not None:
            await tasks.start(gw.access_log.run)
        await tasks.start(run_health_checks, gw.pipeline.upstreams)
        await tasks.start(run_plugin_tasks, gw.pipeline)  # e.g. a JWKS refresh
        task_status.started()


@asynccontextmanager
async def open_standalone() -> AsyncIterator[Callable[[], Pipeline]]:
    """The gateway from ``TRIOGATE_CONFIG`` and its services, running; gives
    the getter of its current pipeline."""
    install_reason_phrases()  # hypercorn answers "200 OK", not "200 "
    path = os.environ.get("TRIOGATE_CONFIG")
    config = load_config(Path(path) if path else None)
    async with open_gateway(config, source=path) as gw, trio.open_nursery() as services:
        discard_limits_env(config.data_dir)  # one process decides: the table would go stale
        await services.start(run_services, gw)
        try:
            yield gw.current_pipeline
        finally:
            services.cancel_scope.cancel()


app = GatewayASGI(opener=open_standalone)
