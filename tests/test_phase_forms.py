"""Synchronous phase forms (``access_nowait``, ``response_nowait``,
``log_nowait``): the gateway calls them directly; one may still hand back an
awaitable when it has to wait; ``await plugin.access(ctx)`` keeps working for
a plugin that only has the synchronous form; a failing ``log_nowait`` is
logged and swallowed like an async one. Through the real listener."""

from __future__ import annotations

from collections.abc import Awaitable
from pathlib import Path
from typing import ClassVar

import pytest
import trio

from triogate.errors import Forbidden
from triogate.plugins.contract import Context, NoConfig, Plugin, Response, settle
from triogate.testing import make_context, open_harness


class Stamp(Plugin[NoConfig]):
    """Every form at once: a sync access that sometimes waits, a sync
    response, a sync log that fails on request."""

    name = "stamp"
    priority = 5000
    seen: ClassVar[list[str]] = []

    def access_nowait(self, ctx: Context) -> Response | Awaitable[Response | None] | None:
        wanted = ctx.request.headers.get("x-want")
        if wanted == "refuse":
            raise Forbidden("refused by a synchronous access phase")
        if wanted == "answer":
            return Response(204)
        if wanted == "wait":
            return self._wait(ctx)
        return None

    async def _wait(self, ctx: Context) -> None:
        await trio.sleep(0.01)
        ctx.response_headers.append((b"x-waited", b"yes"))

    def response_nowait(self, ctx: Context, response: Response) -> None:
        response.headers.raw.append((b"x-stamped", b"1"))

    def log_nowait(self, ctx: Context, response: Response) -> None:
        if ctx.request.headers.get("x-want") == "log-fails":
            raise RuntimeError("a log phase bug")
        self.seen.append(ctx.request_id)


class AsyncAfter(Plugin[NoConfig]):
    """An async log phase after the sync one: the rest still runs, in order."""

    name = "async-after"
    priority = 10
    seen: ClassVar[list[str]] = []

    async def log(self, ctx: Context, response: Response) -> None:
        await trio.lowlevel.checkpoint()
        self.seen.append(ctx.request_id)


def test_sync_forms_count_as_phases() -> None:
    assert Stamp.phases() == ("access", "response", "log")
    assert AsyncAfter.phases() == ("log",)


async def test_the_async_methods_run_the_sync_forms() -> None:
    plugin = Stamp(NoConfig(), env=None)  # type: ignore[arg-type]
    assert await plugin.access(make_context()) is None
    answered = await plugin.access(make_context(headers=[("x-want", "answer")]))
    assert answered is not None and answered.status == 204
    ctx = make_context(headers=[("x-want", "wait")])
    assert await plugin.access(ctx) is None
    assert ctx.response_headers == [(b"x-waited", b"yes")]
    with pytest.raises(Forbidden):
        await plugin.access(make_context(headers=[("x-want", "refuse")]))
    assert await settle(3) == 3


async def test_sync_phase_forms_through_the_listener(tmp_path: Path) -> None:
    Stamp.seen.clear()
    AsyncAfter.seen.clear()
    plugins: dict[str, dict[str, object]] = {"stamp": {}, "async-after": {}}
    async with open_harness(tmp_path, plugins=plugins, extra_plugins=[Stamp, AsyncAfter]) as h:
        r = await h.client.get("/x")
        assert r.status_code == 200
        assert r.headers["x-stamped"] == "1"
        r = await h.client.get("/x", headers={"x-want": "answer"})
        assert r.status_code == 204 and r.headers["x-stamped"] == "1"
        r = await h.client.get("/x", headers={"x-want": "wait"})
        assert r.status_code == 200 and r.headers["x-waited"] == "yes"
        r = await h.client.get("/x", headers={"x-want": "refuse"})
        assert r.status_code == 403 and r.headers["x-stamped"] == "1"
        r = await h.client.get("/x", headers={"x-want": "log-fails"})
        assert r.status_code == 200
        for _ in range(500):  # the log phases run after the answer is out
            if len(AsyncAfter.seen) == 5:
                break
            await trio.sleep(0.01)
    # The failing sync log phase did not stop the async one after it.
    assert len(Stamp.seen) == 4
    assert len(AsyncAfter.seen) == 5
