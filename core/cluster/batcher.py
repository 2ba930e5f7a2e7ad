"""Script runs from concurrent requests, sent to Redis together.

One coredis command costs about as much client CPU as a whole proxied
request; a pipeline of a hundred costs a fraction of that per command. So
requests do not call Redis themselves: they queue their script run and wait,
and one batcher task (in the cluster service's nursery) sends whatever is
queued as one pipeline.

Theory of operation
-------------------
``call`` appends to the queue, wakes the batcher and waits for its result.
The batcher wakes on the next scheduler pass, after every task that was
runnable with the first caller has run, so the requests of one scheduling
tick share one pipeline; it sends at most ``max_items`` per pipeline and
goes on while the queue is not empty (what queued during a round trip is
the next pipeline). There is no timer: a lone request is sent at once.

``send`` queues a run nobody waits for (usage counters): it rides along with
the next pipeline, and is dropped when Redis is unreachable (the queue of
those is bounded; the actors' own LMDB counters stay exact per node).

A pipeline that fails (connection lost, timeout) fails every run in it; the
link (``RedisLink.failed``) then marks Redis unreachable and callers fall
back without queueing until a ping succeeds again. A run refused with
``NOSCRIPT`` (Redis restarted, or ``SCRIPT FLUSH``) loads the scripts and is
sent once more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio
from coredis.exceptions import NoScriptError, RedisError

from triogate.cluster.lua import SCRIPTS, Script
from triogate.cluster.redis import REDIS_ERRORS, RedisLink

__all__ = ["BatchStats", "Batcher", "Call"]

log = logging.getLogger("triogate.cluster.batcher")

#: Fire-and-forget runs waiting at most (beyond it the oldest are dropped).
MAX_BACKLOG: Final = 100_000


class Call:
    """One queued script run and, once sent, its outcome."""

    __slots__ = ("abandoned", "args", "done", "error", "keys", "late", "result", "script")

    def __init__(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.done: trio.Event | None = None  # None: nobody waits (``send``)
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False
        #: Called with the result when it arrives after the caller gave up.
        self.late: Callable[[Any], None] | None = None

    def finish(self, result: Any, error: BaseException | None) -> None:
        self.result, self.error = result, error
        if self.abandoned and error is None and self.late is not None:
            try:
                self.late(result)
            except Exception:
                log.exception("handling a late Redis answer failed")
        if self.done is not None:
            self.done.set()


class BatchStats:
    """Counters for the metrics and the benchmark."""

    __slots__ = ("calls", "dropped", "failed", "pipelines", "reloads")

    def __init__(self) -> None:
        self.pipelines = 0
        self.calls = 0
        self.failed = 0
        self.dropped = 0
        self.reloads = 0

    def __repr__(self) -> str:
        return (
            f"<BatchStats {self.calls} calls in {self.pipelines} pipelines, "
            f"{self.failed} failed, {self.dropped} dropped>"
        )


class Batcher:
    """Queues script runs and sends them in pipelines (module doc)."""

    def __init__(self, link: RedisLink, *, max_items: int = 256) -> None:
        self.link = link
        self.max_items = max_items
        self._queue: list[Call] = []
        self._wake = trio.Event()
        self._loaded = False
        self.stats = BatchStats()
        link.listeners.append(self._on_health)

    def __repr__(self) -> str:
        return f"<Batcher queued={len(self._queue)} {self.stats!r}>"

    def _on_health(self, up: bool) -> None:
        if not up:
            self._loaded = False  # Redis may come back empty: load again

    # ---- the callers ------------------------------------------------------------------

    async def call(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Run ``script`` in the next pipeline and return its reply. A Redis
        error or a lost connection raises (``REDIS_ERRORS``). Cancelled (the
        caller's timeout), the run may still happen: ``call_with``'s
        ``late`` hook sees its result."""
        return await self.call_with(script, keys, args, None)

    async def call_with(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str],
        late: Callable[[Any], None] | None,
    ) -> Any:
        item = Call(script, keys, args)
        item.done = trio.Event()
        item.late = late
        self._queue.append(item)
        self._wake.set()
        try:
            await item.done.wait()
        except BaseException:
            item.abandoned = True
            raise
        if item.error is not None:
            raise item.error
        return item.result

    def send(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> None:
        """Queue a run nobody waits for (dropped while Redis is unreachable)."""
        if not self.link.reachable:
            self.stats.dropped += 1
            return
        if len(self._queue) >= MAX_BACKLOG:
            self.stats.dropped += 1
            return
        self._queue.append(Call(script, keys, args))
        self._wake.set()

    # ---- the batcher task ---------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Send what is queued, forever (cancel to stop): run it in the
        cluster service's nursery."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                batch = self._queue[: self.max_items]
                del self._queue[: self.max_items]
                await self._flush(batch)

    async def _load(self) -> None:
        for script in SCRIPTS:
            await self.link.client.script_load(script.source)
        self._loaded = True
        self.stats.reloads += 1

    async def _flush(self, batch: list[Call]) -> None:
        stats = self.stats
        stats.pipelines += 1
        stats.calls += len(batch)
        timeout = max(self.link.config.command_timeout_seconds * 4, 1.0)
        started = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                if not self._loaded:
                    await self._load()
                results = await self._pipeline(batch)
                retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if retry:
                    await self._load()
                    again = await self._pipeline([batch[i] for i in retry])
                    for i, result in zip(retry, again, strict=True):
                        results[i] = result
        except REDIS_ERRORS as exc:
            stats.failed += len(batch)
            self.link.failed(exc)
            for item in batch:
                item.finish(None, exc)
            return
        self.link.ok(time.perf_counter() - started if len(batch) == 1 else None)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                stats.failed += 1
                item.finish(None, result)
            else:
                item.finish(result, None)

    async def _pipeline(self, batch: Sequence[Call]) -> list[Any]:
        client = self.link.client
        async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
            pending = [pipe.evalsha(c.script.sha, c.keys, c.args) for c in batch]
        out: list[Any] = []
        for request in pending:
            try:
                out.append(await request)
            except RedisError as exc:  # a single run's error (NOSCRIPT, a script error)
                out.append(exc)
        return out
