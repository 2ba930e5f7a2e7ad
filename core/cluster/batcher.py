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

A caller that gives ``give_up_after`` (a decision: ``command_timeout_seconds``)
is answered ``TimeoutError`` once it passes, by the batcher's watchdog task
(one timer for all the waiting runs: a cancel scope per decision costs
about 6 µs of trio's deadline bookkeeping, a fifth of a batched decision).
The run is then *abandoned*, as is one whose caller was cancelled: sent
already, its late answer goes to the ``late`` hook (a grant is undone); not
sent yet, a run with a ``late`` hook (a decision) is dropped, others (a
give-back, a credit operation) still go.

A pipeline that fails (connection lost, timeout) fails every run in it; the
link (``RedisLink.failed``) then marks Redis unreachable and callers fall
back without queueing until a ping succeeds again. A run refused with
``NOSCRIPT`` (Redis restarted, or ``SCRIPT FLUSH``) loads the scripts and is
sent once more.

The wire: with a ``RespPath`` (``resp.py``: the batcher's own socket and
``hiredis.Reader``, about a tenth of coredis's client CPU per decision) the
decisions' scripts (``Script.decision``: DECIDE, UNDO, USAGE) go over it;
credit operations, ``SCRIPT LOAD`` and everything else stay on coredis. A
pipeline mixing both sends each part its way (credit operations are rare).
Without one (a Sentinel URL, or ``thin=False``) every run goes by a coredis
pipeline. Either way a failure means the same to the callers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio
from coredis.exceptions import NoScriptError, RedisError

from triogate.cluster.lua import SCRIPTS, Script
from triogate.cluster.redis import REDIS_ERRORS, RedisLink
from triogate.cluster.resp import RespPath, evalsha

__all__ = ["BatchStats", "Batcher", "Call"]

log = logging.getLogger("triogate.cluster.batcher")

#: Fire-and-forget runs waiting at most (beyond it the oldest are dropped).
MAX_BACKLOG: Final = 100_000


class Call:
    """One queued script run and, once sent, its outcome."""

    __slots__ = (
        "abandoned",
        "args",
        "deadline",
        "done",
        "error",
        "keys",
        "late",
        "result",
        "script",
    )

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
        #: ``trio.current_time()`` past which the caller is answered TimeoutError.
        self.deadline = math.inf

    def finish(self, result: Any, error: BaseException | None) -> None:
        if self.abandoned:  # the caller is gone (timed out, cancelled)
            if error is None and self.late is not None:
                try:
                    self.late(result)
                except Exception:
                    log.exception("handling a late Redis answer failed")
            return
        self.result, self.error = result, error
        if self.done is not None:
            self.done.set()

    def expire(self) -> None:
        """The caller's ``give_up_after`` passed: it gets ``TimeoutError``."""
        if self.done is None or self.abandoned or self.done.is_set():
            return
        self.abandoned = True
        self.error = TimeoutError("no answer from Redis within command_timeout_seconds")
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

    def __init__(
        self, link: RedisLink, *, max_items: int = 256, thin: RespPath | None = None
    ) -> None:
        self.link = link
        self.max_items = max_items
        #: The decisions' own connection (None: every run by coredis).
        self.thin = thin
        self._queue: list[Call] = []
        #: The pipeline being sent (the watchdog looks at it too).
        self._inflight: list[Call] = []
        #: The watchdog's sleep: its deadline is the earliest caller's (inf: none).
        self._watch = trio.CancelScope()
        self._wake = trio.Event()
        self._loaded = False
        self.stats = BatchStats()
        link.listeners.append(self._on_health)

    def __repr__(self) -> str:
        wire = "resp" if self.thin is not None else "coredis"
        return f"<Batcher {wire} queued={len(self._queue)} {self.stats!r}>"

    @property
    def queued(self) -> int:
        """Runs waiting for a pipeline (not the one being sent)."""
        return len(self._queue)

    def _on_health(self, up: bool) -> None:
        if not up:
            self._loaded = False  # Redis may come back empty: load again
        elif self.thin is not None:
            self.thin.reset_backoff()  # Redis answers: reconnect at once

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
        give_up_after: float | None = None,
    ) -> Any:
        """``call`` with a ``late`` hook and, with ``give_up_after`` (seconds),
        a ``TimeoutError`` once it passes without an answer (the module doc)."""
        item = Call(script, keys, args)
        item.done = trio.Event()
        item.late = late
        if give_up_after is not None:
            item.deadline = trio.current_time() + give_up_after
            if item.deadline < self._watch.deadline:
                self._watch.deadline = item.deadline
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
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog)
                task_status.started()
                while True:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    while self._queue:
                        batch = self._queue[: self.max_items]
                        del self._queue[: self.max_items]
                        # A decision given up on before it went out: not
                        # sending it is what its late undo would amount to.
                        batch = [c for c in batch if not (c.abandoned and c.late)]
                        if batch:
                            self._inflight = batch
                            await self._flush(batch)
                            self._inflight = []
        finally:
            if self.thin is not None:
                await self.thin.close()

    async def _watchdog(self) -> None:
        """Answer ``TimeoutError`` to callers whose ``give_up_after`` passed."""
        while True:
            with self._watch:
                await trio.sleep_forever()
            now = trio.current_time()
            earliest = math.inf
            for item in (*self._inflight, *self._queue):
                if item.deadline <= now:
                    item.expire()
                elif item.deadline < earliest and not item.abandoned:
                    earliest = item.deadline
            self._watch = trio.CancelScope(deadline=earliest)

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
        thin = self.thin
        if thin is None:
            return await self._coredis(batch)
        if all(c.script.decision for c in batch):
            return await self._resp(thin, batch)
        # Credit operations (rare) go by coredis, the decisions by the thin path.
        slow = [i for i, c in enumerate(batch) if not c.script.decision]
        fast = [i for i, c in enumerate(batch) if c.script.decision]
        out: list[Any] = [None] * len(batch)
        if fast:
            for i, result in zip(
                fast, await self._resp(thin, [batch[i] for i in fast]), strict=True
            ):
                out[i] = result
        for i, result in zip(slow, await self._coredis([batch[i] for i in slow]), strict=True):
            out[i] = result
        return out

    async def _resp(self, thin: RespPath, batch: Sequence[Call]) -> list[Any]:
        payload = b"".join([evalsha(c.script.sha, c.keys, c.args) for c in batch])
        return await thin.exchange(payload, len(batch))

    async def _coredis(self, batch: Sequence[Call]) -> list[Any]:
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
