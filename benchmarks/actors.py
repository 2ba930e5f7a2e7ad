"""Per-key actors: admission decisions per second (synchronous path against a
mailbox round trip), and the memory of 100,000 live actors.

* sync: ``actor.admit_nowait`` as key-auth calls it (the key's own limit and
  its credits, all-or-nothing), round-robin over many keys;
* mailbox: the same decision as an ``Admit`` message with ``registry.ask``
  (a task switch and back), to show why the hot path does not use it;
* memory: RSS before and after spawning 100,000 actors (each admitted once,
  so each holds limiter state), after they are flushed to a real LMDB and
  evicted, and the flush's cost.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import trio

from triogate.actors import ActorRegistry, Admit
from triogate.ratelimit import Limit
from triogate.storage import Credits, KeyRecord, MemoryStore, open_lmdb_store

from .machine import describe, pin


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _record(i: int) -> KeyRecord:
    return KeyRecord(
        id=f"key_{i:026d}",
        digest=b"",
        digest_version=1,
        start="tg_x",
        name="bench",
        sealed=b"",
        owner_tag=b"",
        owner_tag_version=1,
        scopes=(),
        status="active",
        created_at=0.0,
        updated_at=0.0,
        credits=Credits(10**12),
        credits_set_at=0.0,
    )


LIMITS = (Limit("burst", 1_000_000_000, 1.0),)


def bench_sync(keys: int, seconds: float) -> tuple[float, int]:
    registry = ActorRegistry(MemoryStore(), clock=time.time)
    records = [_record(i) for i in range(keys)]
    actors = [registry.actor(r.id) for r in records]
    pairs = list(zip(actors, records, strict=True))
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        now = time.time()
        for actor, record in pairs:
            admission = actor.admit_nowait(LIMITS, now, record=record, use_credits=True)
        done += len(pairs)
    assert admission.allowed
    return done / (time.perf_counter() - start), done


async def _bench_mailbox(keys: int, seconds: float) -> float:
    registry = ActorRegistry(MemoryStore(), clock=time.time)
    message = Admit(tuple((lim.name, lim.limit, lim.period, lim.algorithm) for lim in LIMITS))
    names = [f"key_{i:026d}" for i in range(keys)]
    done = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            for name in names[:1000]:
                admission = await registry.ask(name, message)
            done += min(len(names), 1000)
        elapsed = time.perf_counter() - start
        assert admission.allowed
        nursery.cancel_scope.cancel()
    return done / elapsed


async def _bench_memory(count: int, data_dir: Path) -> dict[str, float]:
    gc.collect()
    before = _rss_mb()
    async with open_lmdb_store(data_dir, map_size=1 << 30) as store:
        registry = ActorRegistry(store, clock=time.time, idle_timeout=0.0, flush_interval=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run)
            now = time.time()
            for i in range(count):
                record = _record(i)
                actor = registry.actor(record.id)
                actor.admit_nowait(LIMITS, now, record=record, use_credits=True)
                actor.record_nowait(200, now)
            gc.collect()
            live = _rss_mb()
            actors = len(registry.actors)
            t = time.perf_counter()
            await registry.flush(list(registry._dirty.values()))
            flush_s = time.perf_counter() - t
            await registry.evict_idle()
            gc.collect()
            evicted = _rss_mb()
            left = len(registry.actors)
            nursery.cancel_scope.cancel()
    return {
        "before": before,
        "live": live,
        "evicted": evicted,
        "actors": actors,
        "left": left,
        "flush_s": flush_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks actors", description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000, help="keys for the decision loops")
    parser.add_argument("--seconds", type=float, default=3.0, help="per decision benchmark")
    parser.add_argument("--memory-keys", type=int, default=100_000, help="actors for memory")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to (-1: none)")
    args = parser.parse_args(argv)
    pinning = pin(None if args.core < 0 else args.core)
    print("benchmark: per-key actors (admission decisions, memory)")
    print(describe(pinning))
    sync_rate, _ = bench_sync(args.keys, args.seconds)
    mailbox_rate = trio.run(_bench_mailbox, args.keys, args.seconds)
    print(f"decisions/s, synchronous admit_nowait over {args.keys:,} keys: {sync_rate:,.0f}")
    print(
        f"decisions/s, Admit message round trip (registry.ask):     {mailbox_rate:,.0f}"
        f"  ({1e6 / mailbox_rate:.1f} µs vs {1e6 / sync_rate:.1f} µs each)"
    )
    verdict = "meets" if sync_rate >= 500_000 else "BELOW"
    print(f"target: >= 500,000 decisions/s (synchronous path): {verdict}")
    with tempfile.TemporaryDirectory() as tmp:
        mem = trio.run(_bench_memory, args.memory_keys, Path(tmp))
    print(
        f"memory: {int(mem['actors']):,} live actors: RSS {mem['before']:.0f} MB -> "
        f"{mem['live']:.0f} MB (+{mem['live'] - mem['before']:.0f} MB); one flush of them all "
        f"(one LMDB write transaction): {mem['flush_s']:.2f} s; after eviction "
        f"({int(mem['left'])} left): {mem['evicted']:.0f} MB"
    )
    verdict = "meets" if mem["live"] < 200 else "BELOW"
    print(f"target: {args.memory_keys:,} active keys under 200 MB RSS: {verdict}")
    return 0
