"""A full store (hole 9): past ``storage.map_size_mb`` a write is a 507.

* The real gateway over a real 16 MiB LMDB (the smallest map the config
  allows), filled with real writes: admin writes answer 507 ``STORAGE_FULL``
  as problem+json, ``triogate_storage_full_total`` counts them, the log says
  it once with what to do, and the proxy keeps serving keys (validation and
  credits in memory) while usage flushes fail.
* The actors' flusher, on a store that is full and then is not: nothing of
  the counts is lost or doubled, and it never crashes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from triogate.dataplane.actors import ActorRegistry
from triogate.errors import StorageFull
from triogate.storage import MemoryStore, Table, WriteTxn, codec
from triogate.testing import FakeUpstream, harness_config, open_harness

T = TypeVar("T")
PROBLEM_JSON = "application/problem+json"


async def fill(store: object) -> int:
    """Write filler records, big then smaller, until not even 512 bytes fit.
    Bounded: 16 MiB holds at most ~40 of them (asserted)."""
    write = store.write  # type: ignore[attr-defined]
    n = 0
    for size in (1 << 20, 64 << 10, 4 << 10, 512):
        for _ in range(64):
            try:
                await write(
                    lambda txn, n=n, size=size: txn.put(Table.META, b"filler:%06d" % n, b"x" * size)
                )
            except StorageFull:
                break
            n += 1
        else:
            raise AssertionError(f"a 16 MiB store took 64 writes of {size} bytes")
    return n


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


async def test_a_full_store_answers_507_and_the_proxy_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="triogate.storage")
    upstream = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(upstream.run)
        config = harness_config(tmp_path / "data", upstream.url, plugins={"key-auth": {}})
        config = msgspec.structs.replace(
            config, storage=msgspec.structs.replace(config.storage, map_size_mb=16)
        )
        async with open_harness(tmp_path / "data", upstream=upstream, config=config) as h:
            r = await h.admin.post("/setup", json={"name": "root", "email": "root@example.com"})
            assert r.status_code == 201, r.text
            admin = {"Authorization": f"Bearer {r.json()['key']}"}
            r = await h.admin.post(
                "/keys",
                json={"name": "k", "owner": "acme", "credits": {"remaining": 100}},
                headers=admin,
            )
            assert r.status_code == 201, r.text
            key_id, key = r.json()["id"], r.json()["key"]
            bearer = {"Authorization": f"Bearer {key}"}
            assert (await h.client.get("/before", headers=bearer)).status_code == 200

            gw = h.server.gateway
            assert gw is not None
            assert await fill(gw.store) > 10

            # Admin writes: 507 STORAGE_FULL, problem+json, never a 500.
            for attempt in range(3):
                r = await h.admin.post(
                    "/keys", json={"name": f"n{attempt}", "owner": "acme"}, headers=admin
                )
                assert r.status_code == 507, r.text
                assert r.headers["content-type"].startswith(PROBLEM_JSON)
                body = r.json()
                assert (body["status"], body["code"]) == (507, "STORAGE_FULL"), body
            r = await h.admin.delete(f"/keys/{key_id}", headers=admin)
            assert (r.status_code, r.json()["code"]) == (507, "STORAGE_FULL"), r.text

            # The data plane: the key still validates and spends its credits.
            # Its usage flush rewrites a record in place, which LMDB may
            # still fit in the pages the previous commit freed; when it does
            # not, the counts stay in memory (next test). Either way the
            # counts are exact.
            for i in range(5):
                r = await h.client.get(f"/during/{i}", headers=bearer)
                assert r.status_code == 200, r.text
            with contextlib.suppress(StorageFull):
                await gw.actors.flush(list(gw.actors.actors.values()))
            r = await h.admin.get(f"/keys/{key_id}/usage", headers=admin)
            assert r.status_code == 200, r.text
            assert (r.json()["requests"], r.json()["credits_remaining"]) == (6, 94), r.json()

            # Reads go on; the refusals are counted.
            r = await h.admin.get("/metrics", headers=admin)
            assert r.status_code == 200, r.text
            assert metric(r.text, "triogate_storage_full_total") >= 4
            assert metric(r.text, "triogate_storage_map_size_bytes") == 16 << 20
        nursery.cancel_scope.cancel()

    # Said once, with what to do, however many writes were refused.
    said = [rec for rec in caplog.records if "storage is full" in rec.getMessage()]
    assert len(said) == 1, [rec.getMessage() for rec in said]
    assert "raise storage.map_size_mb and restart" in said[0].getMessage().lower()


# ---- the flusher over a store that fills up and then has room -----------------------


class FillingStore(MemoryStore):
    """A memory store whose writes fail with the store's full error while
    ``full`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.refused = 0

    async def write(self, fn: Callable[[WriteTxn], T]) -> T:
        if self.full:
            self.refused += 1
            await trio.lowlevel.checkpoint()
            raise StorageFull("storage is full (test)")
        return await super().write(fn)


async def test_usage_counts_survive_a_full_store_and_are_written_once_there_is_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FillingStore()
    registry = ActorRegistry(
        store, flush_interval=1.0, idle_timeout=3600.0, clock=trio.current_time
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        store.full = True
        for status in (200, 200, 404, 500, 200):
            registry.actor("key_a").record_nowait(status, trio.current_time())
        # Many flush intervals: each flush fails, the flusher backs off and
        # goes on; the counts stay in memory.
        await trio.sleep(30)
        assert store.refused >= 2
        assert registry.statistics().dirty == 1
        with store.read() as txn:
            assert txn.get(Table.USAGE, b"key_a") is None
        store.full = False
        await trio.sleep(120)  # past the longest back-off (60 intervals)
        with store.read() as txn:
            raw = txn.get(Table.USAGE, b"key_a")
        assert raw is not None
        usage = codec.usage.decode(raw)
        assert (usage.requests, usage.by_class) == (5, (0, 3, 0, 1, 1))
        assert registry.statistics().dirty == 0
        nursery.cancel_scope.cancel()
