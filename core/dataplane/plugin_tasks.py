"""The plugins' background work (``Plugin.background``), owned by a pipeline.

A plugin that keeps something fresh off the request path (the ``jwt``
plugin's JWKS) does it in ``background()``. Its owner is the config's
pipeline: the server runs ``run_plugin_tasks`` next to the pipeline's
health checks, in the same cancel scope, so a reload cancels the old
config's tasks once the new one serves, and a stop cancels them all.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from triogate.dataplane.pipeline import Pipeline
from triogate.plugins.contract import Plugin

__all__ = ["background_plugins", "run_plugin_tasks"]

log = logging.getLogger("triogate.dataplane.plugin_tasks")


def background_plugins(pipeline: Pipeline) -> list[Plugin[Any]]:
    """Every plugin instance of ``pipeline`` with background work, once each
    (a global plugin is in every route's chain)."""
    seen: dict[int, Plugin[Any]] = {}
    for chain in (pipeline.global_chain, *pipeline.chains.values()):
        for plugin in chain.plugins:
            if type(plugin).has_background():
                seen.setdefault(id(plugin), plugin)
    return list(seen.values())


async def _guarded(plugin: Plugin[Any]) -> None:
    try:
        await plugin.background()
    except Exception:
        # One plugin's bug must not stop the gateway: logged, that task ends.
        log.exception("the %s plugin's background task failed", plugin.name)


async def run_plugin_tasks(
    pipeline: Pipeline, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``pipeline``'s plugins' background tasks until cancelled."""
    async with trio.open_nursery() as nursery:
        for plugin in background_plugins(pipeline):
            nursery.start_soon(_guarded, plugin)
        task_status.started()
